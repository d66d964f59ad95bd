"""A trained model outside the trainer: rebuilt from its checkpoint, exported, predicting."""
