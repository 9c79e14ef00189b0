"""The ``attribute`` stage: batch attribution of an image corpus on Ray Data, resumable and idempotent, with
the driver's memory independent of the corpus size.

Modules: :mod:`~pipeline.attribute.inputs` (what ``attribute.input`` names, streamed; reading and decoding
an image), :mod:`~pipeline.attribute.plan` (the run's images cut into chunks, written once),
:mod:`~pipeline.attribute.model` (the model pinned once), :mod:`~pipeline.attribute.job` (the Ray Data
pipeline and :func:`attribute`, the run from its record to its manifest),
:mod:`~pipeline.attribute.outputs` (the output layout, the index parts and the reader of a run's masks),
:mod:`~pipeline.attribute.stats` (summary statistics, drift against an earlier run, the MLflow run) and
:mod:`~pipeline.attribute.report` (previews, index.html, the summary).

The model (``explainer.checkpoint``: a checkpoint URI or ``models:/NAME@alias``) is resolved **once**
at the start (alias → version) and loaded on the driver, so a model that does not resolve or load
fails before any work; the loaded :class:`~pipeline.models.predictor.Predictor` (Explainer + the
Explanandum it explains) is shipped to the actors through the object store. The input
(``attribute.input``) is one of

- an image prefix (local folder or ``s3://``): every ``.jpg/.jpeg/.png`` under it, listed page by page;
- a shard split written by ``wysiwyc ingest`` (``OUT/split`` or its ``.manifest.json``);
- a file listing image URIs (one per line, streamed; or a JSON list; relative entries are read from its
  folder).

Compute (Ray Data): ``from_items(pending chunks)`` → ``map_batches(_read_chunk)`` (one task per chunk,
``attribute.read_cpus``: the chunk's images that no index part holds yet, read through
:mod:`pipeline.storage` or taken from the input shard, decoded, converted to RGB and resized to uint8 by
a thread pool, so a bad image becomes an error row instead of failing Ray's reader) →
``map_batches(_Attributor, compute=ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor,
num_gpus=gpus_per_actor)``: normalised on the actor's device, one Explainer pass per ``batch_size`` images
gives the masks of every class and the Explanandum's probabilities; the actor writes the batch's outputs
and then, atomically, its index parts (one per chunk the batch touches).

Outputs under ``output/RUN_ID/`` (``RUN_ID``: ``attribute.run_id``, default the UTC start time)::

    shards/shard-HASH.tar       format shards (default): the masks of one batch of shard_size images, a
                                WebDataset tar: KEY.mask.png (aggregated, at the image's size) and
                                KEY.class_masks.npz per image; HASH of the batch's source URIs
    masks/KK/KEY.png            format objects: aggregated mask (pixel-wise max over the explained
                                classes), uint8, at the source image's size
    class_masks/KK/KEY.npz      format objects: per-class masks of the explained classes at the model's
                                size: masks (K, S, S) uint8 (value/255), classes (K,) indices, names (K,)
    parts/CHUNK/part-HASH-NrEe.parquet   the index: rows of one batch's images of one chunk (N rows, E
                                errors), written atomically after their outputs; one row per image
    plan/CHUNK-HASH.json, _plan.json     the run's images in chunks of shard_size (see plan)
    previews/KEY.png, index.html   mask overlay + masked image of the first attribute.preview_images,
                                and the drift plot (drift.png) when attribute.compare_to is set
    _run.json                   what the run was started with (model version, input, class choice) and
                                by whom (host, pid, start time): created exclusively, its writer owns the run
    _manifest.json              written last: counts, statistics, drift, timings, model, config; marks the
                                run complete

``KEY`` is a hash of the source URI (``KK`` its first two characters), so output names are
deterministic. Resume: the same run id again reads the plan, counts the done images per chunk from the part
names and processes only the images that no part holds yet (error rows count as done), pinned to the model
version recorded in ``_run.json``; the index is then deduplicated chunk by chunk. A run whose
``_manifest.json`` exists is complete and is left untouched. :func:`read_masks`, :func:`iter_masks` and
:func:`read_index` read a complete run back, whichever its format.

One writer per run: ``_run.json`` is created exclusively (locally a hard link, on S3 a conditional
``PUT`` with ``If-None-Match: *``), so of two launches with the same run id that start at once exactly
one creates it. The other reads it and joins only if it would attribute with the same model (same
Explainer sha256), input and settings — the outputs are deterministic, so both write the same bytes
and the index keeps one row per image; otherwise it refuses, naming the owner and its start time.
"""

from pipeline.attribute.job import attribute
from pipeline.attribute.outputs import Masks, iter_masks, read_index, read_masks

__all__ = ["Masks", "attribute", "iter_masks", "read_index", "read_masks"]
