"""Training one model: the `transformers.Trainer` that asks a method for the loss (`trainer`), its callbacks
(`callbacks`), SIGTERM handling (`interrupts`) and the checks made before any step (`preflight`)."""
