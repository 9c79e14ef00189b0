"""The ``attribute`` stage: batch attribution of an image corpus on Ray Data, resumable and idempotent.

Modules: :mod:`~pipeline.attribute.inputs` (what ``attribute.input`` names; reading and decoding an image),
:mod:`~pipeline.attribute.model` (the model pinned once), :mod:`~pipeline.attribute.job` (the Ray Data
pipeline and :func:`attribute`, the run from its record to its manifest),
:mod:`~pipeline.attribute.outputs` (the output layout and the index) and
:mod:`~pipeline.attribute.report` (previews, index.html, the summary).

The model (``explainer.checkpoint``: a checkpoint URI or ``models:/NAME@alias``) is resolved **once**
at the start (alias → version) and loaded on the driver, so a model that does not resolve or load
fails before any work; the loaded :class:`~pipeline.models.predictor.Predictor` (Explainer + the
Explanandum it explains) is shipped to the actors through the object store. The input
(``attribute.input``) is one of

- an image prefix (local folder or ``s3://``): every ``.jpg/.jpeg/.png`` under it, listed page by page;
- a shard split written by ``wysiwyc ingest`` (``OUT/split`` or its ``.manifest.json``);
- a file listing image URIs (one per line, or a JSON list; relative entries are read from its folder).

Compute (Ray Data): ``from_items`` → ``map_batches(_prepare)`` (tasks with ``attribute.read_cpus``:
read the bytes through :mod:`pipeline.storage`, decode, convert to RGB and normalise, so a bad image
becomes an error row instead of failing Ray's reader) → ``map_batches(_Attributor,
compute=ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor, num_gpus=gpus_per_actor)``: one
Explainer pass gives the masks of every class and the Explanandum's probabilities; the actor writes
each image's outputs and then, atomically, the batch's index part. Shard inputs read their tar files in
a ``flat_map`` first.

Outputs under ``output/RUN_ID/`` (``RUN_ID``: ``attribute.run_id``, default the UTC start time)::

    masks/KK/KEY.png            aggregated mask (pixel-wise max over the explained classes), uint8,
                                at the source image's size
    class_masks/KK/KEY.npz      per-class masks of the explained classes at the model's size:
                                masks (K, S, S) uint8 (value/255), classes (K,) indices, names (K,)
    parts/part-HASH.parquet     index rows of one batch (HASH of its source URIs), written atomically
    index.parquet               one row per image (deduplicated by source URI, sorted by it)
    previews/KEY.png, index.html   mask overlay + masked image of the first attribute.preview_images
    _run.json                   what the run was started with (model version, input, class choice) and
                                by whom (host, pid, start time): created exclusively, its writer owns the run
    _manifest.json              written last: counts, timings, model, config; marks the run complete

``KEY`` is a hash of the source URI (``KK`` its first two characters), so output names are
deterministic. Resume: the same run id again processes only the images that no part file holds yet
(error rows count as done), pinned to the model version recorded in ``_run.json``; a run whose
``_manifest.json`` exists is complete and is left untouched.

One writer per run: ``_run.json`` is created exclusively (locally a hard link, on S3 a conditional
``PUT`` with ``If-None-Match: *``), so of two launches with the same run id that start at once exactly
one creates it. The other reads it and joins only if it would attribute with the same model (same
Explainer sha256), input and settings — the outputs are deterministic, so both write the same bytes
and the index keeps one row per image; otherwise it refuses, naming the owner and its start time.
"""

from pipeline.attribute.job import attribute

__all__ = ["attribute"]
