"""The cached-Jacobian backend: W0 is frozen, so each sample's output Jacobian J_i = df(x_i)/dW is
fixed. Cache it once and form g_i = J_i^T dD/dy(y_i, y_ref) by the chain rule for any divergence
and any reference (docs/math.md section 6). For small models an epoch is then a few matrix products.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.func import grad, jacrev, vmap
from tqdm.auto import tqdm

from l3d.core.divergences import Divergence, Reference
from l3d.core.gradients.batch import DenseGradients, check_finite_gradients
from l3d.core.gradients.torchfunc import per_sample_calls, unsqueeze
from l3d.core.model import Target
from l3d.core.samples import Dataset, Inputs, SampleRows, batch_size_of, take, to_device
from l3d.errors import L3DError

# The cache's progress bar appears once a build has taken this long (toys build in well under it).
PROGRESS_DELAY_SECONDS = 3.0


def cache_bytes(target: Target, n_samples: int, n_out: int) -> int:
    """Memory of the cached float32 Jacobians of n_samples samples."""
    return 4 * n_samples * n_out * sum(w.numel() for w in target.w0.values())


def sample_jacobians(target: Target, inputs: Inputs, chunk: int) -> dict[str, Tensor]:
    """Each input's output Jacobian at W0, {name: (n, *out, *shape)}, `chunk` inputs per vmap;
    a model torch.func cannot run this way is one line (`per_sample_calls`). In grad mode: the
    first epoch may start without grad (the trainer's, an analysis'), and jacrev differentiates
    regardless, but some kernels read the grad mode to decide whether to keep what their backward
    needs (the LSTM's CPU kernel: its 'workspace', else a RuntimeError)."""

    def sample_output(params, x):
        return target.forward(unsqueeze(x), params)[0]

    jac = vmap(jacrev(sample_output), in_dims=(None, 0), chunk_size=chunk)
    with torch.enable_grad(), per_sample_calls(target, jacobians=True):
        return jac(target.w0, inputs)


class JacobianCache:
    """Every sample's output Jacobian at W0, (n, n_out, n_w), tensors concatenated in target order
    as DenseGradients.flat; built on the first epoch."""

    def __init__(
        self, target: Target, dataset: Dataset, chunk_size: int | None, progress: bool = True
    ) -> None:
        if dataset.inputs is None:
            raise L3DError(
                "gradient_method='jacobian' needs the data as one tensor (or dict of tensors) and "
                "per_token=False; use 'vmap' or 'auto'"
            )
        self.target, self.dataset, self.chunk_size = target, dataset, chunk_size
        self.progress = progress
        self._jacobian: Tensor | None = None
        self._outputs: Tensor | None = None

    def _build(self) -> tuple[Tensor, Tensor]:
        if self._jacobian is None or self._outputs is None:
            step = self.chunk_size or 256
            assert self.dataset.inputs is not None  # checked in __init__
            inputs = to_device(self.dataset.inputs, self.dataset.device)
            n = batch_size_of(inputs)
            # Chunk by chunk, as vmap's chunk_size would (the same products), to show progress:
            # one backward pass per output element per sample can take minutes.
            parts = []
            with tqdm(
                total=n,
                desc="Jacobian cache",
                unit="sample",
                delay=PROGRESS_DELAY_SECONDS,
                disable=not self.progress,
                leave=False,
                dynamic_ncols=True,
            ) as bar:
                for start in range(0, n, step):
                    chunk = take(inputs, slice(start, start + step))
                    parts.append(sample_jacobians(self.target, chunk, step))
                    bar.update(min(step, n - start))
            jacobians = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
            del parts
            self._outputs = self.target.outputs(inputs)
            for name, j in jacobians.items():
                if not torch.isfinite(j).all():
                    raise L3DError(f"output Jacobians of '{name}' contain NaN/inf at W0")
            n_out = self._outputs[0].numel()
            self._jacobian = torch.cat([j.reshape(n, n_out, -1) for j in jacobians.values()], 2)
        return self._jacobian, self._outputs

    def epoch(
        self,
        divergence: Divergence,
        reference: Reference,
        generator: torch.Generator,
        shuffle: bool,
    ) -> Iterator[DenseGradients]:
        """The whole epoch's gradients in one pass: references are drawn batch by batch (the same
        random stream as drawing them lazily), then g = J^T dD/dy is one product for all samples,
        so a training step only slices its rows."""
        jacobian, all_outputs = self._build()
        n = self.dataset.n_samples
        assert n is not None
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        bs = self.dataset.batch_size
        batches = [order[s : s + bs] for s in range(0, n, bs) if len(order[s : s + bs]) >= 2]
        index = torch.cat(batches).to(self.dataset.device)
        outputs = all_outputs[index]  # (n_used, *out)
        rows = SampleRows(False, None)
        if self.dataset.references is not None:  # fixed references (pairs)
            refs = self.dataset.references.to(outputs.device)[index]
        else:
            refs = torch.cat(
                [
                    reference.draw(outputs[s : s + len(b)], rows, generator)
                    for s, b in zip(range(0, n, bs), batches)
                ]
            )
        dd_dy = vmap(grad(divergence.fn))(outputs, refs).flatten(1)  # (n_used, n_out)
        # Contract in dataset order (no copy of the Jacobians), then gather the rows in batch order.
        dd_dy_data = dd_dy.new_zeros(n, dd_dy.shape[1]).index_copy_(0, index, dd_dy)
        flat = torch.einsum("so,sow->sw", dd_dy_data, jacobian)[index]  # (n_used, n_w)
        check_finite_gradients({"the decomposed tensors": flat})
        for s, b in zip(range(0, n, bs), batches):
            yield DenseGradients.from_flat(
                flat[s : s + len(b)], self.target.shapes, check_finite=False
            )
