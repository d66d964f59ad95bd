"""The console commands, one module each: the only code that sees a Hydra config."""
