"""What users run: the jobs behind every ``fullvq`` command, above the models, pipelines and metrics.

- ``loop`` (+ ``schedule``): the one training loop both stages use (``Trainer``, ``TrainConfig``);
- ``train_tokenizer``: stage one; ``init_codebook``: VQGAN-LC's k-means codebook;
- ``cache_tokens`` (+ ``token_cache``, the format): a dataset encoded once into token shards;
- ``train_generator`` (+ ``generator_stages``): stage two, a GPT or a DiT / flow head;
- ``sample``: images from a pipeline folder;
- ``eval_reconstruction`` / ``eval_generation``: the rFID and gFID jobs;
- ``convert``: original LlamaGen / FVQ / VQGAN-LC checkpoints -> fullvq folders;
- ``demo``: both stages end to end on the built-in digits.

Each command's arguments are parsed by a light module of ``fullvq.commands`` before any of this is
imported.
"""
