"""Reading files people write: YAML with the position of every value, conversation and prompt files."""
