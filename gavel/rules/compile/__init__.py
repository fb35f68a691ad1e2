"""The rule compiler: rules lowered to one tensor program that evaluates them token by token with fixed-size state.

Modules: ir (the node graph), lower (rule conditions to the graph), program (the graph assembled and evaluated:
`compile_rules`, `RuleProgram`), rowsets (the CPU's sparse rows), kernels (the window operators).
"""
