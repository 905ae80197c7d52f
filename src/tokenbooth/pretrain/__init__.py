"""Scripts that pretrain the shipped models from scratch on toyworld (mini, toyCLIP); their outputs go to `assets/`."""
