"""AdaRAS: reasoning-critical MLP neurons from paired correct and incorrect traces, the neuron-steering
intervention and the adaptive failure gate."""
