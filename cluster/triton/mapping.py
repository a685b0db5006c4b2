"""A Triton model's ``config.pbtxt`` -> what the fleet serves, and what it does not.

Pure (no Ray, no files): the importer (``cluster.triton.importer``) reads the repository and
hands the text, the version directories and the files here. Triton's own message
(``model_config.proto``, parsed with protobuf's text format) is the only reading of the
configuration; ``workers.kserve.model_config`` turns it into serving options.

What is mapped:
- ``platform``/``backend``: ``onnxruntime_onnx``/``onnxruntime`` (an ONNX source, built for the
  fleet's targets) and ``tensorrt_plan``/``tensorrt`` (plan files served as they are, their targets
  from ``cc_model_filenames`` and ``default_model_filename`` with the TensorRT version the
  parameters state);
- ``max_batch_size``, ``input``/``output`` (checked against the model's own at import),
  ``version_policy``, ``dynamic_batching``, ``instance_group`` (``count``), the TensorRT
  accelerator's ``precision_mode``, ``parameters``, ``model_warmup``.
Fields that change what a model computes or how it is called and that the fleet does not serve
refuse the model (one message naming them all); hints it does not follow are noted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from google.protobuf.message import Message

from workers.errors import ImportRefused, InvalidInput
from workers.kserve.model_config import DATATYPE_TO_TRITON, TRITON_TO_DATATYPE, read_config, serving_options
from workers.kserve.proto import model_config_pb2 as mc
from workers.manifest import check_name
from workers.messages import LoadOptions
from workers.targets import parse_version
from workers.tensors import TensorSpec
from workers.warmup import WarmupInput, WarmupSample, check_warmup

ONNX, PLAN = "onnx", "plan"
PLATFORMS = {"onnxruntime_onnx": ONNX, "tensorrt_plan": PLAN}
BACKENDS = {"onnxruntime": ONNX, "tensorrt": PLAN}
DEFAULT_FILES = {ONNX: "model.onnx", PLAN: "model.plan"}
CONFIG_FILE = "config.pbtxt"
WARMUP_DIR = "warmup"
# parameters the fleet reads (Triton keeps any key): the TensorRT version the plans were built with
# (one for all, or per compute capability), and the compute capability of default_model_filename
TRT_VERSION = "tensorrt_version"
COMPUTE_CAPABILITY = "compute_capability"
# what refuses a model: it would compute or be called differently than on Triton
REFUSED = ("batch_input", "batch_output", "sequence_batching", "ensemble_scheduling", "model_operations",
           "model_repository_agents")
# hints the fleet does not follow (reported): metrics and caching of Triton itself
NOTED = ("metric_tags", "model_metrics", "response_cache", "runtime")


@dataclass
class ModelImport:
    """What the fleet imports of one Triton model."""

    name: str
    kind: str  # ONNX | PLAN
    config: mc.ModelConfig  # as written, the name filled in
    versions: list[str]  # the version directories the policy selects, oldest first
    precision: str = "float32"
    notes: list[str] = field(default_factory=list)  # fields reported and not obeyed

    @property
    def batched(self) -> bool:
        return self.config.max_batch_size > 0


def refuse(model: str, problems: list[str]) -> ImportRefused:
    return ImportRefused(f"model '{model}' is skipped: " + "; ".join(problems))


def kind_of(config: mc.ModelConfig, files: set[str]) -> str | None:
    """ONNX, PLAN, or None (another backend). Without platform and backend, as Triton's auto-complete:
    by the model file present."""
    by_platform, by_backend = PLATFORMS.get(config.platform), BACKENDS.get(config.backend)
    if config.platform and by_platform is None or config.backend and by_backend is None:
        return None
    if by_platform and by_backend and by_platform != by_backend:
        return None
    if by_platform or by_backend:
        return by_platform or by_backend
    found = {kind for kind, name in DEFAULT_FILES.items() for f in files if f.endswith(name[name.index("."):])}
    return found.pop() if len(found) == 1 else None


def _tensor_fields(config: mc.ModelConfig, kind: str) -> tuple[list[str], list[str]]:
    refused, notes = [], []
    for tensor in config.input:
        where = f"input '{tensor.name}'"
        for flag in ("is_shape_tensor", "allow_ragged_batch", "is_non_linear_format_io"):
            if getattr(tensor, flag):
                refused.append(f"{where} {flag}")
        if tensor.format:
            notes.append(f"{where} format {mc.ModelInput.Format.Name(tensor.format)} (informational)")
        if kind == PLAN and tensor.HasField("reshape"):
            refused.append(f"{where} reshape on a TensorRT plan (the fleet reshapes by editing an ONNX source)")
        if kind == PLAN and tensor.optional:
            refused.append(f"{where} optional on a TensorRT plan (the fleet can only check it in an ONNX model)")
    for tensor in config.output:
        where = f"output '{tensor.name}'"
        for flag in ("is_shape_tensor", "is_non_linear_format_io"):
            if getattr(tensor, flag):
                refused.append(f"{where} {flag}")
        if tensor.label_filename:
            notes.append(f"{where} label_filename (classification results are not served)")
        if kind == PLAN and tensor.HasField("reshape"):
            refused.append(f"{where} reshape on a TensorRT plan")
    return refused, notes


def _optimization(config: mc.ModelConfig, kind: str) -> tuple[str, list[str], list[str]]:
    """(precision, refused, notes) of ``optimization``: the TensorRT accelerator's precision_mode
    builds float16 (FP16) or float32 (FP32); everything else in it is a hint."""
    if not config.HasField("optimization"):
        return "float32", [], []
    if kind == PLAN:
        return "float32", [], ["optimization (a plan is served as it was built)"]
    precision, refused, notes = "float32", [], []
    accelerators = config.optimization.execution_accelerators
    for accel in accelerators.gpu_execution_accelerator:
        if accel.name != "tensorrt":
            notes.append(f"gpu_execution_accelerator '{accel.name}'")
            continue
        for key, value in sorted(accel.parameters.items()):
            if key != "precision_mode":
                notes.append(f"tensorrt accelerator parameter {key}")
            elif value.upper() == "FP16":
                precision = "float16"
            elif value.upper() == "INT8":
                refused.append("tensorrt accelerator precision_mode INT8 (it needs calibration data: import with FP16 or "
                               "FP32, then `fleet build MODEL.onnx --name NAME --precision int8_calib --calib-data DATA`)")
            elif value.upper() != "FP32":
                refused.append(f"tensorrt accelerator precision_mode {value} (FP32, FP16)")
    if accelerators.cpu_execution_accelerator:
        notes.append("cpu_execution_accelerator " + ", ".join(a.name for a in accelerators.cpu_execution_accelerator))
    rest = [f.name for f, _ in config.optimization.ListFields() if f.name != "execution_accelerators"]
    notes += [f"optimization {name}" for name in rest]
    return precision, refused, notes


def _serving_fields(config: mc.ModelConfig) -> list[str]:
    """Notes on dynamic batching and instance groups: what the fleet does not follow."""
    notes = []
    batching = config.dynamic_batching
    skipped = [f.name for f, _ in batching.ListFields()
               if f.name not in ("preferred_batch_size", "max_queue_delay_microseconds", "default_queue_policy")]
    skipped += [f"default_queue_policy {f.name}" for f, _ in batching.default_queue_policy.ListFields()
                if f.name != "max_queue_size"]
    notes += [f"dynamic_batching {name}" for name in skipped]
    for group in config.instance_group:
        said = [f"kind {mc.ModelInstanceGroup.Kind.Name(group.kind)}"] if group.kind else []
        said += [f"gpus {list(group.gpus)}"] if group.gpus else []
        said += [f.name for f, _ in group.ListFields() if f.name not in ("name", "kind", "count", "gpus")]
        if said:
            notes.append(f"instance_group {', '.join(said)} (placement belongs to the fleet's router and "
                         f"budgets; count {group.count or 1} is obeyed as slots per engine)")
    return notes


def read_model(name: str, text: str | None, versions: dict[str, set[str]]) -> ModelImport:
    """One model directory (``versions``: numeric version directory -> the files in it) -> what to
    import; ImportRefused with one message naming every field the fleet does not serve."""
    try:
        check_name("model name", name)
    except ValueError as exc:
        raise refuse(name, [str(exc)]) from None
    try:
        config = read_config(text or "", name, pbtxt=True)
    except InvalidInput as exc:
        raise refuse(name, [f"{CONFIG_FILE}: {exc.message}"]) from None
    if config.name and config.name != name:
        raise refuse(name, [f"{CONFIG_FILE} names it '{config.name}' (Triton needs the directory's name)"])
    config.name = name
    kind = kind_of(config, set().union(*versions.values()) if versions else set())
    if kind is None:
        what = config.platform or config.backend or "no platform, backend or model.onnx/model.plan"
        raise refuse(name, [f"platform/backend {what} (the fleet serves onnxruntime_onnx and tensorrt_plan)"])
    refused = [f.name for f, _ in config.ListFields() if f.name in REFUSED]
    if config.model_transaction_policy.decoupled:
        refused.append("model_transaction_policy decoupled")
    notes = [f.name for f, _ in config.ListFields() if f.name in NOTED]
    more_refused, more_notes = _tensor_fields(config, kind)
    precision, accel_refused, accel_notes = _optimization(config, kind)
    refused += more_refused + accel_refused
    notes += more_notes + accel_notes + _serving_fields(config)
    kept = sorted(k for k in config.parameters if k != TRT_VERSION and not k.startswith(TRT_VERSION + ":")
                  and k != COMPUTE_CAPABILITY)
    if kept:
        notes.append(f"parameters {', '.join(kept)} (kept: the config endpoint shows them; not interpreted)")
    if kind == ONNX and config.cc_model_filenames:
        notes.append("cc_model_filenames (an ONNX source is built for every target)")
    if refused:
        raise refuse(name, [f"the fleet does not serve {', '.join(refused)}"])
    selected, policy_notes = select_versions(config, sorted(versions, key=int))
    if not selected:
        raise refuse(name, [f"no version directory to serve (present: {', '.join(sorted(versions)) or 'none'}; "
                            f"version_policy {_policy_text(config)})"])
    return ModelImport(name, kind, config, selected, precision, notes + policy_notes)


def _policy_text(config: mc.ModelConfig) -> str:
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return "all"
    if which == "specific":
        return f"specific {list(policy.specific.versions)}"
    return f"latest {policy.latest.num_versions or 1}" if which else "latest 1 (Triton's default)"


def select_versions(config: mc.ModelConfig, present: list[str]) -> tuple[list[str], list[str]]:
    """The versions Triton would serve (``present``: numeric directory names), oldest first, and notes."""
    policy = config.version_policy
    which = policy.WhichOneof("policy_choice")
    ordered = sorted(present, key=int)
    if which == "all":
        return ordered, []
    if which == "specific":
        wanted = [str(v) for v in policy.specific.versions]
        missing = [v for v in wanted if v not in present]
        notes = [f"version_policy specific names version(s) {', '.join(missing)} without a directory"] if missing else []
        return [v for v in ordered if v in wanted], notes
    count = policy.latest.num_versions if which == "latest" else 1
    return ordered[-max(1, count):] if ordered else [], []


def tensorrt_version(config: mc.ModelConfig, cc: str) -> str | None:
    """The TensorRT version a plan for ``cc`` was built with, as the parameters state it."""
    params = config.parameters
    value = (params.get(f"{TRT_VERSION}:{cc}") or params.get(TRT_VERSION) or mc.ModelParameter()).string_value.strip()
    if not value:
        return None
    parse_version(value)
    return value


def plan_files(config: mc.ModelConfig, files: set[str]) -> tuple[dict[str, str], list[str]]:
    """Compute capability -> plan file of one version directory, and what could not be placed."""
    chosen: dict[str, str] = {}
    problems = []
    for cc, filename in sorted(config.cc_model_filenames.items()):
        if filename in files:
            chosen[cc] = filename
        else:
            problems.append(f"cc_model_filenames names {filename} for {cc}, which is not there")
    default = config.default_model_filename or DEFAULT_FILES[PLAN]
    if default in files and default not in chosen.values():
        cc = config.parameters[COMPUTE_CAPABILITY].string_value.strip() if COMPUTE_CAPABILITY in config.parameters else ""
        if cc and cc not in chosen:
            chosen[cc] = default
        elif not cc:
            problems.append(f"{default}: no compute capability for it (add parameters {{ key: \"{COMPUTE_CAPABILITY}\" "
                            f"value {{ string_value: \"7.5\" }} }}, or name it in cc_model_filenames)")
    return chosen, problems


def tensor_problems(config: mc.ModelConfig, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> list[str]:
    """How the configuration's inputs and outputs differ from the model's own (empty: they agree).
    A dimension the model leaves dynamic (-1) takes any value; with ``reshape``, the model's side
    is the reshape's shape."""
    batched = config.max_batch_size > 0
    problems = []
    for kind, given, specs in (("input", config.input, inputs), ("output", config.output, outputs)):
        by_name = {s.name: s for s in specs}
        for tensor in given:
            spec = by_name.get(tensor.name)
            if spec is None:
                problems.append(f"{kind} '{tensor.name}' is not one of the model's ({', '.join(by_name)})")
                continue
            problems += _tensor_problem(kind, tensor, spec, batched)
        named = {t.name for t in given}
        if kind == "input" and given:
            problems += [f"the model's input '{s.name}' is not in the configuration" for s in specs
                         if s.name not in named and not s.optional]
        if batched:  # those the configuration leaves to the model need the batch dimension too
            problems += [f"{kind} '{s.name}' has shape {list(s.shape)} in the model, without a dynamic batch "
                         f"dimension first: max_batch_size needs one (use max_batch_size: 0 and the full dims)"
                         for s in specs if s.name not in named and (not s.shape or s.shape[0] >= 0)]
    return problems


def _tensor_problem(kind: str, tensor: Message, spec: TensorSpec, batched: bool) -> list[str]:
    where = f"{kind} '{tensor.name}'"
    datatype = TRITON_TO_DATATYPE.get(tensor.data_type)
    if datatype != spec.datatype:
        return [f"{where} is {spec.datatype} in the model, the configuration says {mc.DataType.Name(tensor.data_type)}"]
    shape = list(spec.shape)
    if batched:
        if not shape or shape[0] >= 0:
            return [f"{where} has shape {shape} in the model, without a dynamic batch dimension first: max_batch_size "
                    f"{'needs one' if shape else 'cannot apply'} (use max_batch_size: 0 and the full dims)"]
        shape = shape[1:]
    model_side = list(tensor.reshape.shape) if tensor.HasField("reshape") else list(tensor.dims)
    if len(model_side) != len(shape) or any(m >= 0 and m != c for m, c in zip(shape, model_side)):
        said = f"reshape {model_side}" if tensor.HasField("reshape") else f"dims {list(tensor.dims)}"
        return [f"{where} has dims {shape} in the model{' (without the batch dimension)' if batched else ''}, "
                f"the configuration says {said}"]
    if tensor.HasField("reshape") and all(d >= 0 for d in list(tensor.dims) + model_side):
        if _count(tensor.dims) != _count(model_side):
            return [f"{where}: dims {list(tensor.dims)} ({_count(tensor.dims)} values) cannot be reshaped to "
                    f"{model_side} ({_count(model_side)} values)"]
    if kind == "input" and tensor.optional and not spec.optional:
        return [f"{where} is optional in the configuration, and the model has no default for it"]
    return []


def _count(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def served_specs(config: mc.ModelConfig) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs as the configuration declares them (for a plan whose own IO only TensorRT can read)."""
    lead = (-1,) if config.max_batch_size > 0 else ()

    def spec(t) -> TensorSpec:
        return TensorSpec(t.name, TRITON_TO_DATATYPE[t.data_type], lead + tuple(t.dims))

    return tuple(spec(t) for t in config.input), tuple(spec(t) for t in config.output)


def complete(config: mc.ModelConfig, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> mc.ModelConfig:
    """The configuration as Triton's auto-complete would show it: the model's inputs and outputs
    where it declares none."""
    done = mc.ModelConfig()
    done.CopyFrom(config)
    lead = 1 if config.max_batch_size > 0 else 0
    if not done.input:
        for s in inputs:
            done.input.add(name=s.name, data_type=DATATYPE_TO_TRITON[s.datatype], dims=s.shape[lead:], optional=s.optional)
    if not done.output:
        for s in outputs:
            done.output.add(name=s.name, data_type=DATATYPE_TO_TRITON[s.datatype], dims=s.shape[lead:])
    return done


def warmup_samples(config: mc.ModelConfig, files: dict[str, bytes]) -> tuple[WarmupSample, ...]:
    """``model_warmup`` as samples (``files``: the model's ``warmup/`` directory, by name);
    InvalidInput naming a file that is not there."""
    samples = []
    for warmup in config.model_warmup:
        inputs = []
        for name, given in sorted(warmup.inputs.items()):
            source = given.WhichOneof("input_data_type")
            data = b""
            if source == "input_data_file":
                if given.input_data_file not in files:
                    raise InvalidInput(f"model_warmup '{warmup.name}': input '{name}' reads {WARMUP_DIR}/"
                                       f"{given.input_data_file}, which is not there")
                data = files[given.input_data_file]
            kind = {"zero_data": "zero", "random_data": "random", "input_data_file": "file"}.get(source or "", "zero")
            inputs.append(WarmupInput(name, TRITON_TO_DATATYPE[given.data_type], tuple(given.dims), kind, data))
        batch = warmup.batch_size if config.max_batch_size > 0 else 0
        samples.append(WarmupSample(warmup.name, tuple(inputs), batch, max(1, warmup.count)))
    return tuple(samples)


def warmup_problems(config: mc.ModelConfig, files: dict[str, bytes], inputs: tuple[TensorSpec, ...]) -> list[str]:
    try:
        samples = warmup_samples(config, files)
    except (InvalidInput, KeyError) as exc:
        return [str(exc)]
    if config.max_batch_size <= 0 and any(w.batch_size > 1 for w in config.model_warmup):
        return ["model_warmup batch_size over 1 for a model without batching (max_batch_size 0)"]
    return [f"model_warmup '{s.name}': {problem}" for s in samples
            if (problem := check_warmup(s, inputs, config.max_batch_size > 0))]


def imported_options(config: mc.ModelConfig, base: LoadOptions, files: dict[str, bytes]) -> LoadOptions:
    """How the fleet serves an imported model: ``base`` (the fleet config's ``models.<m>``) with what
    its whole Triton configuration says, and its warm-up samples."""
    options = serving_options(config, base, config.max_batch_size, config.name, whole=True)
    return dataclasses.replace(options, warmup=warmup_samples(config, files))
