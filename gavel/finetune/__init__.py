"""Fine-tuning few parameters: "A Few Bad Neurons" selects the MLP neurons behind a behaviour and tunes only them."""
