"""Selective Steering (a rotation in a plane fitted from two prompt classes) and the methods that share its plane:
the Angular Steering baselines, activation addition and directional ablation."""
