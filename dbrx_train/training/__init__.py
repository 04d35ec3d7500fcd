"""Training with Composer: the typed training config, the ComposerModel seam, callbacks, the trainer builder."""
