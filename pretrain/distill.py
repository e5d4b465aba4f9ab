"""Distillation entry point: a student learns a pretrained teacher, and the same command resumes.

    python -m pretrain.distill --config=configs/distill.py --config.teacher=runs/mlm --workdir=runs/mlm-distilled \
        [--config.student.num_layers=2] [--config.student.size=tiny] [--config.distill.hidden_weight=1]

Distillation is a program of the training loop (`pretrain.loop`), a pretraining program
with a teacher: the same workdir, checkpoints, exact resume, signals, NaN policy and
metrics as `pretrain.train`. The student trains on the teacher's objective, data and
tokenizer (from the teacher's config.json) with the loss of `pretrain.distillation`:
DistilBERT's soft targets, hard loss and hidden-state cosine, and TinyBERT's
intermediate-layer terms as an option. By default the student is the teacher's shape
with half its layers, starting from the teacher's embeddings, heads and the layers
DistilBERT's code keeps. The teacher's parameters are restored once, read by every step
as frozen parameters (`pretrain.parallel`) and never written: no checkpoint of the
student holds them, and the teacher's directory is only read. Its held-out evaluation
reports the student's objective loss (comparable with the teacher's own) and the
distillation terms (`loss/distill_soft` with the student's top-1 agreement with the
teacher as its accuracy, `loss/distill_cosine` with the mean cosine).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from pretrain.config_checks import schema_problems, validate_config
from pretrain.distillation import (ATTENTION, COSINE, HIDDEN, LAYER_CHOICES, SOFT, DistillationWeights,
                                   distillation_counts, distillation_loss, student_from_teacher, teacher_layers,
                                   weights_problems)
from pretrain.hf.imported_tokenizer import FILENAME as IMPORTED_TOKENIZER
from pretrain.inference import checkpoint_steps, load_trained, read_run_config
from pretrain.loop import Loop
from pretrain.loss import step_token_statistics
from pretrain.metrics import flops_per_token
from pretrain.model import PRESETS
from pretrain.resolve import resolve_config
from pretrain.tokenizer import MODEL_FILENAME
from pretrain.train import PretrainingProgram, training_command
from pretrain.train_step import make_step

INIT_CHOICES = ("auto", "teacher", "random")
WIDTH_FIELDS = ("model_dim", "num_heads", "mlp_dim")  # a student starts from its teacher only where these match


def _problems_error(problems: list[str]) -> ValueError:
    return ValueError("invalid config:\n  " + "\n  ".join(problems))


def student_shape(teacher_model: Any, student: Any) -> dict[str, Any]:
    """The student's `config.model` fields: the teacher's, with `student.size`'s shape over
    them when given, then each non-zero field of `student`; half the teacher's layers
    (at least 1) unless a size or `student.num_layers` says otherwise."""
    fields = dict(teacher_model.to_dict() if hasattr(teacher_model, "to_dict") else teacher_model)
    fields["heads"] = ()  # the objectives' loss terms add theirs again (`resolve_config`)
    fields["hidden_projection_dim"] = 0
    if student.size:
        if student.size not in PRESETS:
            raise _problems_error([f"config.student.size={student.size!r} must be '' (the teacher's shape) or one "
                                   f"of {', '.join(PRESETS)}"])
        fields.update(PRESETS[student.size])
    else:
        fields["num_layers"] = max(1, teacher_model.num_layers // 2)
    for name in ("num_layers", *WIDTH_FIELDS):
        if student[name]:
            fields[name] = student[name]
    return fields


class DistillationProgram(PretrainingProgram):
    """Distillation as a program of the loop (see module docstring): pretraining's pipeline,
    model and evaluation, a teacher held as frozen parameters, and the distillation loss."""

    def resolve(self, config: Any) -> Any:
        """The run's pretraining config: the teacher's (objective, data, tokenizer, model)
        with this config's loop fields, the student's shape and the distillation recorded
        under `config.distill`. Refuses an unknown field or a teacher that is not a run."""
        from configs.distill import LOOP_FIELDS, get_config  # the schema; configs import pretrain

        problems = schema_problems(config, get_config().to_dict())
        if problems:
            raise _problems_error(problems)
        if not config.teacher:
            raise _problems_error(["config.teacher is empty: give the pretraining run to distil, e.g. "
                                   "--config.teacher=runs/mlm"])
        teacher_dir = os.path.abspath(config.teacher)
        teacher = read_run_config(teacher_dir, "--config.teacher")
        steps = checkpoint_steps(teacher_dir)
        run = teacher.copy_and_resolve_references()
        for field in LOOP_FIELDS:
            if field not in ("batch_size", "seq_len") or config[field]:
                run[field] = config[field]
        run.init.hf = ""  # the student starts from its teacher (or at random), not from an imported model
        run.tokenizer.model_path = os.path.join(teacher_dir, MODEL_FILENAME)
        run.model = ml_collections.ConfigDict(student_shape(teacher.model, config.student))
        widths_match = all(run.model[name] == teacher.model[name] for name in WIDTH_FIELDS)
        init = config.student.init
        if init == "auto":
            init = "teacher" if widths_match else "random"
        layers = []
        if init == "teacher" and config.student.layers in LAYER_CHOICES:
            try:
                layers = list(teacher_layers(teacher.model.num_layers, run.model.num_layers, config.student.layers))
            except ValueError:
                layers = []  # `validate` names the problem
        run.distill = ml_collections.ConfigDict(dict(
            teacher=teacher_dir, teacher_step=steps[-1], init=init, layers=config.student.layers,
            teacher_layers=layers, **config.distill.to_dict()))
        resolved = resolve_config(run)
        if config.distill.hidden_weight and run.model.model_dim != teacher.model.model_dim:
            resolved.model.heads = (*resolved.model.heads, "hidden_projection")
            resolved.model.hidden_projection_dim = teacher.model.model_dim
        return resolved

    def validate(self, config: Any) -> None:
        """Raises ValueError naming every problem of the resolved run: the pretraining
        config's, the distillation weights', and what the student's shape allows."""
        problems = []
        try:
            validate_config(config, jax.device_count())
        except ValueError as error:
            problems += [line.strip() for line in str(error).splitlines()[1:]]
        distill = config.distill
        problems += weights_problems(distill)
        teacher = read_run_config(distill.teacher, "--config.teacher").model
        student = config.model
        if distill.init not in INIT_CHOICES:
            problems.append(f"config.student.init={distill.init!r} must be one of {INIT_CHOICES}")
        if distill.layers not in LAYER_CHOICES:
            problems.append(f"config.student.layers={distill.layers!r} must be one of {LAYER_CHOICES}")
        elif distill.init == "teacher":
            changed = [f"{name} {student[name]} (teacher {teacher[name]})" for name in WIDTH_FIELDS
                       if student[name] != teacher[name]]
            if changed:
                problems.append(f"config.student.init='teacher' needs the teacher's width, but the student has "
                                f"{', '.join(changed)}; set config.student.init='random' (or 'auto')")
            else:
                try:
                    teacher_layers(teacher.num_layers, student.num_layers, distill.layers)
                except ValueError as error:
                    problems.append(str(error))
        if distill.cosine_weight and student.model_dim != teacher.model_dim:
            problems.append(f"config.distill.cosine_weight={distill.cosine_weight} compares hidden states of one "
                            f"width, but the student is {student.model_dim} wide and the teacher {teacher.model_dim}; "
                            "set it to 0 (TinyBERT's config.distill.hidden_weight projects between widths)")
        tiny = distill.hidden_weight or distill.attention_weight
        if tiny and teacher.num_layers % student.num_layers:
            problems.append(f"TinyBERT's terms (config.distill.hidden_weight, attention_weight) map student layers "
                            f"onto teacher layers uniformly: the teacher's {teacher.num_layers} layers must divide by "
                            f"the student's {student.num_layers}")
        if distill.attention_weight and student.num_heads != teacher.num_heads:
            problems.append(f"config.distill.attention_weight compares attention scores head by head: the student "
                            f"has {student.num_heads} heads and the teacher {teacher.num_heads}; give the student "
                            "the teacher's (config.student.num_heads) or set it to 0")
        if os.path.isfile(os.path.join(distill.teacher, IMPORTED_TOKENIZER)):
            problems.append(f"config.teacher={distill.teacher!r} started from a Hugging Face model and keeps its "
                            "tokenizer.json, which a student cannot take yet; distil a teacher with a SentencePiece "
                            "tokenizer (tokenizer.model)")
        if problems:
            raise _problems_error(problems)

    def build(self, config: Any, workdir: str, primary: bool, strategy: Any) -> nnx.State:
        """The teacher (restored once, as frozen parameters), then pretraining's pipeline
        and model for the student, which starts from the teacher's layers when
        `config.distill.init` says so; returns the student's parameters."""
        distill = config.distill
        teacher = load_trained(distill.teacher)
        params = super().build(config, workdir, primary, strategy)
        if teacher.tokenizer.vocab_size != self.pipeline.tokenizer.vocab_size:
            raise ValueError(f"the teacher's tokenizer has {teacher.tokenizer.vocab_size} tokens and the student's "
                             f"{self.pipeline.tokenizer.vocab_size}: the student must read the teacher's "
                             "tokenizer.model")
        if distill.init == "teacher":
            from pretrain.hf.models import flat_params, set_flat_params

            student = nnx.merge(self.graphdef, params, self.rest)
            set_flat_params(student, student_from_teacher(flat_params(teacher.model), flat_params(student),
                                                          distill.teacher_layers))
            self.graphdef, params, self.rest = nnx.split(student, nnx.Param, ...)
        self.teacher = teacher
        self.teacher_graphdef, self.frozen, self.teacher_rest = nnx.split(teacher.model, nnx.Param, ...)
        self.weights = DistillationWeights(**{field.name: distill[field.name]
                                              for field in dataclasses.fields(DistillationWeights)})
        self.reported_terms = tuple(name for name, weight in (
            (SOFT, self.weights.soft_weight), (COSINE, self.weights.cosine_weight),
            (HIDDEN, self.weights.hidden_weight), (ATTENTION, self.weights.attention_weight)) if weight > 0)
        teacher_config = teacher.model.config
        teacher_parameters = sum(x.size for x in jax.tree.leaves(self.frozen))
        embedding = sum(getattr(teacher.model, name).size for name in ("token_embedding", "position_embedding",
                                                                         "type_embedding"))
        # the teacher's forward pass: a third of its training FLOPs
        self.flops_per_token += flops_per_token(teacher_parameters - embedding, teacher_config.num_layers,
                                                teacher_config.model_dim, config.seq_len) / 3
        return params

    def run_info(self) -> dict[str, Any]:
        """Pretraining's record, with the teacher and the distillation settings."""
        return {**super().run_info(), "distill": self.config.distill.to_dict()}

    def _loss(self, teacher_params: nnx.State) -> Callable:
        """loss(params, batch, totals, step) of the student against the teacher of `teacher_params`."""
        terms = self.pipeline.mixture.loss_terms

        def loss_fn(params, batch, totals, step):
            del step  # the loss does not change over the run
            student = nnx.merge(self.graphdef, params, self.rest)
            teacher = nnx.merge(self.teacher_graphdef, teacher_params, self.teacher_rest)
            return distillation_loss(student, teacher, batch, len(self.names), totals, self.weights, terms=terms,
                                     statistics=step_token_statistics)

        return loss_fn

    def step_functions(self, axis_name: str | None) -> tuple[Callable, Callable]:
        """(train step, evaluation step), each taking the teacher's parameters third."""
        totals_fn = functools.partial(distillation_counts, terms=self.pipeline.mixture.loss_terms,
                                      num_heads=self.model_config.num_heads)

        def step_fn(state, batch, teacher_params):
            return make_step(self._loss(teacher_params), totals_fn, self.optimizer, self.config.accumulation_steps,
                             axis_name)(state, batch)

        def eval_fn(params, batch, teacher_params):
            totals = jax.tree.map(lambda total: jnp.maximum(total, 1.0), totals_fn(batch))
            return self._loss(teacher_params)(params, batch, totals, 0)[1]

        return step_fn, eval_fn

    def describe(self, start: int, workdir: str) -> list[tuple[str, str]]:
        """Pretraining's settings, with the teacher and the distillation loss."""
        distill, w = self.config.distill, self.weights
        teacher = self.teacher.model.config
        start_from = (f"teacher layers {list(distill.teacher_layers)}" if distill.init == "teacher"
                      else "random initialisation")
        lines = super().describe(start, workdir)
        lines.insert(1, ("teacher", f"{distill.teacher} at step {self.teacher.step}: {teacher.num_layers} layers, "
                                    f"width {teacher.model_dim}; the student starts from {start_from}"))
        lines.insert(2, ("distill", f"T={w.temperature:g}; weights soft {w.soft_weight:g}, hard {w.hard_weight:g}, "
                                    f"cosine {w.cosine_weight:g}, hidden {w.hidden_weight:g}, "
                                    f"attention {w.attention_weight:g}"))
        return lines


class DistillationTrainer(Loop):
    """The distillation command's loop: `Loop(config, workdir, DistillationProgram())`."""

    def __init__(self, config: Any, workdir: str | os.PathLike):
        super().__init__(config, workdir, DistillationProgram())


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pretrain.distill`: flags are defined here, not at import."""
    training_command(argv, __doc__, "configs/distill.py", DistillationTrainer)


if __name__ == "__main__":
    main()
