"""Why PLMs work: layer-wise probes on frozen representations (:mod:`probes`), the
features of every layer (:mod:`features`), SentEval-style surface tasks (:mod:`surface`)
and the ``peft-jax probe`` command (:mod:`cli`)."""
