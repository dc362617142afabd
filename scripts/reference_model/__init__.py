"""Research and diagnostics tooling of the reference model (:mod:`vdit_sparse.reference_model`).

Modules:

- :mod:`.videos`: the procedural videos the model is trained on (``ShapeVideos``)
  and their vocabularies (colours, shapes, directions).
- :mod:`.weights`: writing the weights file and reading its training summary.
- :mod:`.train`: trains the model (VAE, then transformer and T5 text encoder).
- :mod:`.sample`: samples the model and maps its attention structure.
- :mod:`.adherence`: does the model draw the prompted colour, direction and shape?
- :mod:`.word_sensitivity`: how the model's predictions and attention follow each prompt word.
- :mod:`.text_embeddings`: how far apart the text encoder puts prompts one word apart.

The runnable ones run from the repository root, each with ``--help``::

    python -m scripts.reference_model.train --help
    python -m scripts.reference_model.sample
    python -m scripts.reference_model.adherence --device cuda
    python -m scripts.reference_model.word_sensitivity
    python -m scripts.reference_model.text_embeddings
"""
