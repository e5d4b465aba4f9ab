"""Knowledge distillation: the losses a student learns its teacher by, and its start
from the teacher's layers. The command and its program are `pretrain.distill`;
task-time distillation (a fine-tuned teacher's logits) is `pretrain.transfer.trainer`'s.

DistilBERT (Sanh et al. 2019; its code, Hugging Face's `research_projects/distillation`):

  loss = soft_weight * KL(teacher_T || student_T) * T^2      at the objective's positions
       + hard_weight * the objective's own loss              (the student's MLM / CLM / ...)
       + cosine_weight * mean(1 - cos(student, teacher))     last hidden states, every token

with the code's defaults (`--alpha_ce 5.0 --alpha_mlm 2.0 --alpha_cos 1.0`, T = 2). The
KL is taken where the objective takes its loss (the masked positions of MLM, every
predicting position of a causal LM: token-level KL), summed and divided by the
positions' weight, as the code's `KLDivLoss(reduction='batchmean')` over the selected
rows. The student starts from the teacher: embeddings, heads and the layers
`teacher_layers` chooses (the code's `extract_distilbert.py` keeps BERT-base's layers
0, 2, 4, 7, 9, 11: evenly spaced with the first and the last, 'distilbert'; the paper's
"one layer out of two" is 'every_other').

TinyBERT (Jiao et al. 2020; its code, `general_distill.py`), as an option: the hidden
states of every student layer m (and of the embeddings, m = 0) against teacher layer
m * (teacher layers / student layers) by MSE, through one learned projection where the
widths differ (the `hidden_projection` head); the attention scores (q k^T / sqrt(K),
before the softmax) of student layer m against teacher layer (m + 1) * ratio - 1 by MSE,
with hidden (query, key) pairs counted as zero, as the code does.

Every loss is a sum here, divided by a global count the step adds across devices and
micro-batches (`pretrain.train_step`), so a distillation step shards like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from objectives.terms import LossTerm
from pretrain.attention import attention_mask
from pretrain.layers import Attention, block_at
from pretrain.loss import counts, loss_of_hidden, prepared_batch
from pretrain.model import Transformer

Batch = Mapping[str, jax.Array]
COSINE_EPSILON = 1e-12  # torch's CosineEmbeddingLoss: cos = x.y / sqrt((|x|^2 + eps)(|y|^2 + eps))
LAYER_CHOICES = ("distilbert", "every_other")  # which teacher layers a student of fewer layers starts from
# the statistics groups distillation adds to a step's `terms` (loss/<name> in the metrics)
SOFT, COSINE, HIDDEN, ATTENTION = "distill_soft", "distill_cosine", "distill_hidden", "distill_attention"


@dataclasses.dataclass(frozen=True)
class DistillationWeights:
    """The weights of the distillation loss (`config.distill`; DistilBERT's code's defaults)."""

    temperature: float = 2.0
    soft_weight: float = 5.0  # KL to the teacher's softened distribution (the code's alpha_ce)
    hard_weight: float = 2.0  # the objective's own loss (alpha_mlm, or alpha_clm for a causal model)
    cosine_weight: float = 1.0  # 1 - cos of the last hidden states (alpha_cos); needs equal widths
    hidden_weight: float = 0.0  # TinyBERT: MSE of the mapped layers' hidden states
    attention_weight: float = 0.0  # TinyBERT: MSE of the mapped layers' attention scores


def weights_problems(fields: Mapping[str, Any]) -> list[str]:
    """Every problem of `config.distill`'s weights, naming field and fix."""
    problems = []
    for field in dataclasses.fields(DistillationWeights):
        value = fields.get(field.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            problems.append(f"config.distill.{field.name}={value!r} must be a number >= 0")
    if not problems and fields["temperature"] <= 0:
        problems.append(f"config.distill.temperature={fields['temperature']!r} must be > 0 (DistilBERT uses 2)")
    return problems


# -- the student's start -------------------------------------------------------------------

def teacher_layers(teacher: int, student: int, choice: str) -> tuple[int, ...]:
    """The teacher layers a student of `student` layers starts from: 'distilbert' (evenly
    spaced, first and last kept: 12 -> 0, 2, 4, 7, 9, 11, as DistilBERT's extraction
    script) or 'every_other' (0, 2, 4, ...: the paper's one layer out of two)."""
    if choice not in LAYER_CHOICES:
        raise ValueError(f"config.student.layers={choice!r} must be one of {LAYER_CHOICES}")
    if not 1 <= student <= teacher:
        raise ValueError(f"a student of {student} layers cannot start from a teacher of {teacher}: "
                         "choose config.student.num_layers between 1 and the teacher's layers")
    if choice == "every_other":
        if 2 * (student - 1) >= teacher:
            raise ValueError(f"every other layer of a {teacher}-layer teacher gives at most {(teacher + 1) // 2} "
                             f"layers, not {student}; lower config.student.num_layers or use layers='distilbert'")
        return tuple(range(0, 2 * student, 2))
    return tuple(int(index) for index in np.round(np.linspace(0, teacher - 1, student)))


def student_from_teacher(teacher: Mapping[str, np.ndarray], student: Mapping[str, np.ndarray],
                         layers: Sequence[int]) -> dict[str, np.ndarray]:
    """The student's parameters (dotted loop-layout paths, `pretrain.hf.models.flat_params`)
    taken from the teacher's: student block i is teacher block `layers[i]`, everything
    else (embeddings, norms, the vocabulary head, heads both have) the teacher's own; what
    the teacher lacks (a head of the student's alone) keeps the student's initialisation."""
    taken = {}
    for name, value in student.items():
        source = name
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            source = f"blocks.{layers[int(index)]}.{rest}"
        taken[name] = teacher.get(source, value)
        if taken[name].shape != value.shape:
            raise ValueError(f"the student's {name} has shape {value.shape} and the teacher's {source} "
                             f"{taken[name].shape}: a student starts from its teacher only at the teacher's width; "
                             "set config.student.init='random'")
    return taken


# -- the losses, as sums --------------------------------------------------------------------

def soft_target_sums(student_logits: jax.Array, teacher_logits: jax.Array, weights: jax.Array,
                     temperature: float) -> dict[str, jax.Array]:
    """Sums over positions of weight x KL(teacher || student) at `temperature`, times T^2
    (`loss_sum`), of weight x [the student's top token is the teacher's] (`correct_sum`:
    their agreement), and of the weights. Logits [..., V], weights [...]."""
    teacher_log = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    student_log = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    divergence = jnp.sum(jnp.exp(teacher_log) * (teacher_log - student_log), axis=-1) * temperature ** 2
    agree = (jnp.argmax(student_logits, axis=-1) == jnp.argmax(teacher_logits, axis=-1)).astype(jnp.float32)
    return {"loss_sum": jnp.sum(weights * divergence), "correct_sum": jnp.sum(weights * jax.lax.stop_gradient(agree)),
            "weight_sum": jnp.sum(weights)}


def cosine_sums(student: jax.Array, teacher: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
    """Sums over the `tokens` (bool [...]) of 1 - cos(student, teacher) (`loss_sum`) and of
    the cosine itself (`correct_sum`: 'accuracy' is the mean cosine), for hidden states
    [..., D] of one width."""
    student, teacher = student.astype(jnp.float32), teacher.astype(jnp.float32)
    dot = jnp.sum(student * teacher, axis=-1)
    norms = jnp.sqrt((jnp.sum(student ** 2, -1) + COSINE_EPSILON) * (jnp.sum(teacher ** 2, -1) + COSINE_EPSILON))
    cosine = dot / norms
    weight = tokens.astype(jnp.float32)
    return {"loss_sum": jnp.sum(weight * (1 - cosine)), "correct_sum": jnp.sum(weight * jax.lax.stop_gradient(cosine)),
            "weight_sum": jnp.sum(weight)}


def squared_error_sums(student: jax.Array, teacher: jax.Array, where: jax.Array) -> dict[str, jax.Array]:
    """Sums of the squared differences where `where` (broadcast against the arrays) holds
    (`loss_sum`), and of the elements counted (`weight_sum`): MSE as a sum and a count."""
    where = jnp.broadcast_to(where, student.shape).astype(jnp.float32)
    difference = student.astype(jnp.float32) - teacher.astype(jnp.float32)
    return {"loss_sum": jnp.sum(where * difference ** 2), "weight_sum": jnp.sum(where)}


def layer_map(teacher: int, student: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """TinyBERT's uniform mapping: (the teacher state each student state 0..student is
    matched with (0: the embeddings), the teacher layer each student layer's attention is
    matched with)."""
    ratio = teacher // student
    return tuple(m * ratio for m in range(student + 1)), tuple((m + 1) * ratio - 1 for m in range(student))


def attention_scores(model: Transformer, states: Sequence[jax.Array], batch: Batch, layers: Sequence[int]
                     ) -> list[jax.Array]:
    """The attention scores [B, H, L, L] (float32, before mask and softmax) of each of
    `layers`, from the states that enter them (`model.layer_outputs`)."""
    scores = []
    for index in layers:
        block = block_at(model.blocks, model.config, index)
        x = states[index]
        if model.config.pre_layer_norm:
            x = block.attention_norm(x).astype(model.config.compute_dtype)
        q, k, _ = block.attention.project(x)
        scores.append(Attention.scores(q, k))
    return scores


def distillation_counts(batch: Batch, terms: Sequence[LossTerm], num_heads: int) -> dict[str, Any]:
    """The global denominators of a distillation step: the objective's `counts`, the real
    tokens, and the visible (query, key) pairs times the student's heads."""
    visible = attention_mask(batch["segment_ids"], batch["attention_kind"])
    return {"loss": counts(batch, terms), "tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32),
            "pairs": visible.sum().astype(jnp.float32) * num_heads}


def distillation_loss(student: Transformer, teacher: Transformer, batch: Batch, num_objectives: int,
                      totals: Mapping[str, Any], weights: DistillationWeights, *, terms: Sequence[LossTerm] = (),
                      statistics: Any = None) -> tuple[jax.Array, dict]:
    """(loss, statistics sums) of a distillation step (see module docstring). The student
    reads the batch its heads prepare; the teacher reads the same batch, without
    gradients. `totals`: `distillation_counts` of the global batch (each at least 1).
    The statistics are the objective's (per objective and per loss term) with the
    distillation terms added under `terms`."""
    prepared_inputs, prepared = prepared_batch(student, batch, terms)
    keep = weights.hidden_weight > 0 or weights.attention_weight > 0
    student_states = student.layer_outputs(prepared_inputs) if keep else [student(prepared_inputs)]
    teacher_states = jax.lax.stop_gradient(teacher.layer_outputs(prepared_inputs) if keep
                                           else [teacher(prepared_inputs)])
    hidden = student_states[-1]
    extra = {} if statistics is None else {"statistics": statistics}
    hard, stats = loss_of_hidden(student, hidden, prepared_inputs, prepared, num_objectives, totals["loss"],
                                 terms=terms, **extra)
    loss = weights.hard_weight * hard
    tokens = prepared_inputs["segment_ids"] > 0
    distilled = {}
    if weights.soft_weight > 0:
        teacher_logits = jax.lax.stop_gradient(teacher.logits(teacher_states[-1]))
        distilled[SOFT] = soft_target_sums(student.logits(hidden), teacher_logits, prepared_inputs["weights"],
                                           weights.temperature)
        loss = loss + weights.soft_weight * distilled[SOFT]["loss_sum"] / totals["loss"][0]
    if weights.cosine_weight > 0:
        distilled[COSINE] = cosine_sums(hidden, teacher_states[-1], tokens)
        loss = loss + weights.cosine_weight * distilled[COSINE]["loss_sum"] / totals["tokens"]
    if keep:
        states_map, attention_map = layer_map(teacher.config.num_layers, student.config.num_layers)
    if weights.hidden_weight > 0:
        project = (student.head("hidden_projection") if "hidden_projection" in student.config.heads
                   else (lambda x: x))
        sums = [squared_error_sums(project(student_states[m]), teacher_states[t], tokens[..., None])
                for m, t in enumerate(states_map)]
        distilled[HIDDEN] = jax.tree.map(lambda *xs: sum(xs), *sums)
        width = teacher.config.model_dim
        loss = loss + weights.hidden_weight * distilled[HIDDEN]["loss_sum"] / (totals["tokens"] * width)
    if weights.attention_weight > 0:
        visible = attention_mask(prepared_inputs["segment_ids"], prepared_inputs["attention_kind"])
        student_scores = attention_scores(student, student_states, prepared_inputs, range(student.config.num_layers))
        teacher_scores = attention_scores(teacher, teacher_states, prepared_inputs, attention_map)
        sums = [squared_error_sums(s, jax.lax.stop_gradient(t), visible)
                for s, t in zip(student_scores, teacher_scores)]
        distilled[ATTENTION] = jax.tree.map(lambda *xs: sum(xs), *sums)
        loss = loss + weights.attention_weight * distilled[ATTENTION]["loss_sum"] / totals["pairs"]
    stats["terms"] = {**stats.get("terms", {}), **distilled}
    return loss, stats
