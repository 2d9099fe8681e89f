"""Batch training jobs: `gradserve train JOB.yaml`.

A job file names a dataset, a model, an optimizer and a schedule of epochs; the runner streams the
batches through the SDK to a gradserve service (a running one, or one it embeds), checkpoints, and
reports. Modules, one concept each:

- `jobfile`   the job-file schema, its validation and the command-line overrides
- `datasets`  built-in scikit-learn sets, `.npz`, `.csv` and `.parquet` files (`parquet_data`),
              checked before any training; categorical columns hashed into table rows (`hashing`)
- `synthetic_ctr`  the built-in click-through set drawn from a planted model
- `click_metrics`  log-loss and ROC AUC of click logits
- `split`     seeded train/test split, standardisation fitted on train, the resumable batch order
- `modelspec` the `mlp:` shorthand and graph specs, completed from the data's widths
- `evaluate`  test loss and accuracy from pulled parameters with the engine's forward pass
- `progress`  the per-epoch progress bar (silent when stderr is not a terminal)
- `report`    the metrics JSON-lines file and the loss/accuracy plot
- `state`     the job-side checkpoint record: data-order position next to the service checkpoint
- `runner`    the training loop
- `torch_interop`  `torch.nn.Sequential` / state_dict <-> spec + parameters (imports torch lazily)

Nothing here is imported by `import gradserve`; torch is imported only inside `torch_interop`.
"""

from __future__ import annotations

__all__: list[str] = []
