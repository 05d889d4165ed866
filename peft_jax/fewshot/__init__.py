"""Few-shot learning with PLMs: multi-token verbalizer scoring (:mod:`scoring`), ProtoVerb
(:mod:`protoverb`, :mod:`protoverb_frozen`), PET ensembling / distillation (:mod:`pet`),
self-training pseudo-labels (:mod:`self_training`) and the ``peft-jax fewshot`` command
(:func:`peft_jax.fewshot.cli.fewshot_main`)."""
