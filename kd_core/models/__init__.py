"""The models of a run: how one is built, loaded and sized (`build`), and what is read off a causal LM (`lm`:
its head's inputs, per-token log-probs)."""
