"""The recipe's distill stage: teacher + spec + data → a student (torch module or HF folder) and its record."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepipe.core import distill as D
from edgepipe.core.errors import BadInput, CheckFailed
from edgepipe.core.loader import load_callable
from edgepipe.recipe import DistillSpec, Recipe
from edgepipe.sources import data as data_mod
from edgepipe.sources.export import call_factory, module_digest

logger = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "config.json")


@dataclasses.dataclass
class Distilled:
    """What the pipeline exports instead of the teacher: a module (torch) or a recipe pointing at a folder (hf)."""

    recipe: Recipe
    module: nn.Module | None
    record: dict[str, Any]


def train_config(spec: DistillSpec) -> D.TrainConfig:
    return D.TrainConfig(spec.loss, spec.temperature, spec.epochs, spec.lr, spec.batch_size, spec.seed, spec.threads)


def run_distill(recipe: Recipe, calibration: Callable[[], Iterator[dict]] | None, eval_data: list | None, workdir: Path) -> Distilled:
    """Distill the recipe's teacher into a student; CheckFailed when the student misses ``distill.max_drop``."""
    spec = recipe.distill
    assert spec is not None
    if spec.data == "calibration":
        assert calibration is not None  # the recipe validator requires data.calibration
        samples, data_ref = D.stack_batches(calibration()), "calibration"
    else:
        samples, data_ref = D.stack_batches(data_mod.calibration_source(spec.data, recipe.base_dir)()), spec.data
    if eval_data:
        eval_samples = D.stack_batches(b for b, _ in eval_data)
        labels = np.concatenate([y for _, y in eval_data]) if all(y is not None for _, y in eval_data) else None
        eval_origin = "eval"
    else:
        eval_samples, labels, eval_origin = samples, None, "distill data (no data.eval)"
    start = time.perf_counter()
    if recipe.model.kind == "torch":
        result = _torch(recipe, spec, samples, eval_samples, labels)
    elif recipe.model.kind == "hf":
        folder, record = distill_hf_folder(
            hf_folder(recipe.model.hf or "", recipe.base_dir), workdir / "student", samples, train_config(spec), _hf_student(recipe, spec),
            eval_samples, labels, recipe.model.task, recipe.base_dir,
        )
        model = recipe.model.model_copy(update={"hf": str(folder)})
        result = Distilled(recipe.model_copy(update={"model": model}), None, record)
    else:
        raise BadInput("distill needs a torch or hf model source")
    record = result.record
    record["data"] = {"source": data_ref, "samples": len(next(iter(samples.values())))}
    record["eval_data"] = eval_origin
    record["seconds"] = round(time.perf_counter() - start, 2)
    _check_budget(spec, record)
    m = record["metrics"]
    logger.info("  distill " + ", ".join(f"{k} {v}" for k, v in m.items() if k != "samples") + f" ({record['seconds']}s)")
    return result


def _check_budget(spec: DistillSpec, record: dict) -> None:
    """``max_drop`` applies to label top-1 drop (logits with labels), else 1 - agreement / 1 - cosine."""
    m = record["metrics"]
    drop = m.get("top1_drop", 1 - m.get("agreement", m.get("cosine_to_teacher", 0.0)))
    record["drop"] = round(drop, 6)
    record["max_drop"] = spec.max_drop
    record["passed"] = spec.max_drop is None or drop <= spec.max_drop + 1e-12
    if not record["passed"]:
        raise CheckFailed(
            f"distill: the student drops {drop:.4f} from the teacher (budget {spec.max_drop}); "
            "train longer (distill.epochs), shrink less, or raise distill.max_drop"
        )


def _call_factory(ref: str, base: Path, teacher: nn.Module) -> nn.Module:
    """``path.py:function`` → module; a factory taking one argument gets the teacher (to copy weights from)."""
    fn = load_callable(ref, base)
    try:
        takes_teacher = len(inspect.signature(fn).parameters) >= 1
        student = fn(teacher) if takes_teacher else fn()
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"distill.student '{ref}' failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(student, nn.Module):
        raise BadInput(f"distill.student '{ref}' returned {type(student).__name__}, not a torch.nn.Module")
    return student


def _torch(recipe: Recipe, spec: DistillSpec, samples: dict, eval_samples: dict, labels) -> Distilled:
    teacher = call_factory(recipe)
    if not isinstance(teacher, nn.Module):
        raise BadInput(f"model factory '{recipe.model.torch}' returned {type(teacher).__name__}, not a torch.nn.Module")
    teacher = teacher.eval()
    names = [i.name for i in recipe.inputs or []]
    if sorted(samples) != sorted(names):
        raise BadInput(f"distill data yields inputs {sorted(samples)} but the recipe declares {names}; make the names match")
    example = tuple(torch.from_numpy(np.ascontiguousarray(samples[n][:2])) for n in names)
    torch.manual_seed(spec.seed)  # the student's fresh weights
    how: dict[str, Any]
    if spec.student:
        student, how = _call_factory(spec.student, recipe.base_dir, teacher), {"factory": spec.student}
    elif spec.shrink and spec.shrink.params is not None:
        student, factor = D.shrink_to_params(teacher, spec.shrink.params, example)
        how = {"shrink": "width", "factor": round(factor, 4), "params_budget": spec.shrink.params}
    elif spec.shrink and spec.shrink.width is not None:
        student, how = D.shrink_width(teacher, spec.shrink.width, example), {"shrink": "width", "factor": spec.shrink.width}
    else:
        assert spec.shrink and spec.shrink.layers is not None
        student, index = D.shrink_layers(teacher, spec.shrink.layers)
        how = {"shrink": "layers", "teacher_layers": index}
    forward = D.positional(names)
    record = _train_and_measure(teacher, student, samples, forward, train_config(spec), eval_samples, labels)
    record["teacher"]["source"] = recipe.model.torch
    record["student"].update(how)
    return Distilled(recipe, student, record)


def _train_and_measure(teacher, student, samples, forward, cfg: D.TrainConfig, eval_samples, labels) -> dict:
    t_out = D.outputs(teacher, eval_samples, forward).numpy()
    before = D.compare_outputs(D.outputs(student, eval_samples, forward).numpy(), t_out, labels, cfg.loss)
    history = D.train(teacher, student, samples, forward, cfg)
    s_out = D.outputs(student, eval_samples, forward).numpy()
    t_params, s_params = D.param_count(teacher), D.param_count(student)
    return {
        "teacher": {"params": t_params, "sha256": module_digest(teacher)},
        "student": {"params": s_params, "ratio": round(s_params / t_params, 4), "sha256": module_digest(student)},
        **dataclasses.asdict(cfg),
        "loss_history": [round(v, 6) for v in history],
        "metrics_before": before,
        "metrics": D.compare_outputs(s_out, t_out, labels, cfg.loss),
    }


# ----------------------------------------------------------------------------- Hugging Face encoders


def _hf_student(recipe: Recipe, spec: DistillSpec) -> int | list[int] | str:
    if spec.student:
        return spec.student
    if not spec.shrink or spec.shrink.layers is None:
        raise BadInput("distill for an hf model shrinks by layers: use distill.shrink: {layers: 3} or distill.student")
    return spec.shrink.layers


def hf_folder(ref: str, base: Path) -> Path:
    """A local HF folder: relative to the recipe, or ``pkg://package/sub/folder`` inside an installed package."""
    if not ref.startswith("pkg://"):
        return (base / ref).resolve()
    package, _, sub = ref.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(f"model.hf {ref}: package '{package}' is not installed; pip install it or give a folder")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def hf_forward(task: str | None) -> Callable[[nn.Module, D.Batch], torch.Tensor]:
    """Logits for text-classification, else the mean-pooled sentence embedding."""
    if task == "text-classification":
        return lambda module, batch: module(**batch).logits
    return D.mean_pooled


def distill_hf_folder(
    folder: Path, out: Path, samples: dict[str, np.ndarray], cfg: D.TrainConfig, student: int | list[int] | str,
    eval_samples: dict[str, np.ndarray], labels: np.ndarray | None = None, task: str | None = None,
    base: Path | None = None,
) -> tuple[Path, dict]:
    """Distill a local HF encoder folder into ``out`` (a folder the hf source can export like the teacher's).

    ``student`` is layers to keep (a count or teacher indices; initialized from those layers) or a
    ``path.py:function`` (relative to ``base``) given the teacher. Tokenizer and other non-weight files are copied over.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    if cfg.loss == "kl" and task != "text-classification":
        raise BadInput("distill.loss kl needs logits; for embeddings (feature-extraction) use loss: cosine or mse")
    auto = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
    try:
        teacher = auto.from_pretrained(str(folder), local_files_only=True).eval()
    except Exception as exc:
        raise BadInput(f"distill: cannot load the teacher from {folder}: {type(exc).__name__}: {exc}") from None
    torch.manual_seed(cfg.seed)
    if isinstance(student, str):
        model, how = _call_factory(student, base or Path.cwd(), teacher), {"factory": student}
    else:
        model, index = D.shrink_layers(teacher, student)
        how = {"shrink": "layers", "teacher_layers": index}
    record = _train_and_measure(teacher, model, samples, hf_forward(task), cfg, eval_samples, labels)
    record["teacher"]["source"] = str(folder)
    record["student"].update(how)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns(*WEIGHT_FILES))
    model.save_pretrained(str(out))
    return out, record
