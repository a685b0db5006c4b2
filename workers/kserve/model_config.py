"""Triton's model configuration (``model_config.proto``) of a fleet model, both ways.

- ``model_config``: a model version's manifests and its serving options -> a
  ``ModelConfig`` message, what Triton's tools read (``GET /v2/models/{m}/config``, the
  gRPC ``ModelConfig`` call, perf_analyzer);
- ``config_json``: that message as Triton's JSON (proto field names, 64-bit integers as
  numbers, as Triton's HTTP endpoint writes them);
- ``read_config`` and ``apply_config``: a configuration written by a user (a load with a
  config override; a Triton repository's ``config.pbtxt`` for the import) -> a checked
  message -> the serving options it asks for, or a clear error naming the field.

Pure: no Ray, no engines, no I/O.
"""

from __future__ import annotations

import dataclasses

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from workers.errors import InvalidInput
from workers.kserve.proto import model_config_pb2 as mc
from workers.manifest import Manifest
from workers.messages import LoadOptions
from workers.tensors import TensorSpec

DATATYPE_TO_TRITON: dict[str, int] = {
    "BOOL": mc.TYPE_BOOL, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64, "INT8": mc.TYPE_INT8, "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64, "BYTES": mc.TYPE_STRING,
}
TRITON_TO_DATATYPE = {v: k for k, v in DATATYPE_TO_TRITON.items()}

# What a configuration may set for the fleet to apply it; other fields it does not serve are refused by name.
APPLIED = {"name", "platform", "backend", "max_batch_size", "input", "output", "dynamic_batching", "instance_group",
           "version_policy", "parameters", "default_model_filename"}
_INT64 = (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64)


def platform_of(manifests: list[Manifest]) -> tuple[str, str]:
    """(Triton's platform, backend) of a model version's artifacts."""
    if manifests and all(m.target.backend == "tensorrt" for m in manifests):
        return "tensorrt_plan", "tensorrt"
    return "onnxruntime_onnx", "onnxruntime"


def _tensor_dims(spec: TensorSpec, batched: bool) -> list[int]:
    return list(spec.shape[1:] if batched else spec.shape)


def model_config(manifests: list[Manifest], options: LoadOptions, *, slots: int, gpu: bool) -> mc.ModelConfig:
    """The configuration Triton would show for this model version, served with ``options``."""
    first = manifests[0]
    platform, backend = platform_of(manifests)
    batched = first.batched
    config = mc.ModelConfig(name=first.model, platform=platform, backend=backend,
                            max_batch_size=options.max_batch_for(first.max_batch) if batched else 0)
    config.version_policy.latest.num_versions = 1
    for spec in first.inputs:
        config.input.add(name=spec.name, data_type=DATATYPE_TO_TRITON[spec.datatype], dims=_tensor_dims(spec, batched),
                         optional=spec.optional)
    for spec in first.outputs:
        config.output.add(name=spec.name, data_type=DATATYPE_TO_TRITON[spec.datatype], dims=_tensor_dims(spec, batched))
    if batched and options.dynamic_batching:
        config.dynamic_batching.preferred_batch_size.extend(options.preferred_batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(name=first.model, kind=kind, count=options.slots or slots)
    config.default_model_filename = first.artifact_file
    config.parameters["fleet_precision"].string_value = ",".join(sorted({m.precision for m in manifests}))
    config.parameters["fleet_targets"].string_value = ",".join(sorted({m.target.key() for m in manifests}))
    return config


def config_json(message: Message) -> dict:
    """A message as Triton's HTTP endpoints write it: proto field names, enums by name, every
    field, and 64-bit integers as JSON numbers (protobuf's JSON printer makes them strings)."""
    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    _numbers(message.DESCRIPTOR, data)
    return data


def _numbers(descriptor, data: dict) -> None:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            entry = field.message_type
            if entry.GetOptions().map_entry:
                value_field = entry.fields_by_name["value"]
                for key in value:
                    if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                        _numbers(value_field.message_type, value[key])
                    elif value_field.type in _INT64:
                        value[key] = int(value[key])
            else:
                for item in value if isinstance(value, list) else [value]:
                    _numbers(entry, item)


def read_config(text: str, model: str, *, pbtxt: bool = False) -> mc.ModelConfig:
    """A user's configuration (JSON, or protobuf text as in ``config.pbtxt``) -> a message;
    InvalidInput naming the problem ("failed to load ..." as Triton says it)."""
    config = mc.ModelConfig()
    try:
        if pbtxt:
            text_format.Parse(text, config)
        else:
            json_format.Parse(text, config)
    except (json_format.ParseError, text_format.ParseError, ValueError) as exc:
        raise InvalidInput(f"failed to load '{model}': the model configuration is not valid "
                           f"{'protobuf text' if pbtxt else 'JSON'} of Triton's ModelConfig: {exc}") from None
    return config


def _check_tensors(kind: str, given, specs: tuple[TensorSpec, ...], batched: bool, model: str) -> None:
    """Inputs or outputs a configuration names must be the model's, with its types and dims."""
    by_name = {s.name: s for s in specs}
    for tensor in given:
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InvalidInput(f"failed to load '{model}': the configuration names {kind} '{tensor.name}', which the "
                               f"model does not have ({', '.join(by_name)})")
        datatype = TRITON_TO_DATATYPE.get(tensor.data_type)
        if datatype != spec.datatype:
            raise InvalidInput(f"failed to load '{model}': {kind} '{tensor.name}' is {spec.datatype} in the model, "
                               f"the configuration says {mc.DataType.Name(tensor.data_type)}")
        dims = _tensor_dims(spec, batched)
        if list(tensor.dims) != dims:
            raise InvalidInput(f"failed to load '{model}': {kind} '{tensor.name}' has dims {dims} in the model "
                               f"(without the batch dimension), the configuration says {list(tensor.dims)}")


def apply_config(config: mc.ModelConfig, manifest: Manifest, options: LoadOptions) -> LoadOptions:
    """The serving options ``config`` asks for, checked against the model (``manifest``):
    ``max_batch_size`` (at most what the artifact was built for), dynamic batching, the instance
    count. Inputs and outputs it names must match the model's; fields the fleet does not serve are
    refused."""
    check_config(config, manifest)
    return serving_options(config, options, manifest.max_batch if manifest.batched else 0, manifest.model)


def check_config(config: mc.ModelConfig, manifest: Manifest) -> None:
    """InvalidInput unless the fleet can serve ``manifest``'s model as ``config`` says."""
    model = manifest.model
    unsupported = sorted(f.name for f, _ in config.ListFields() if f.name not in APPLIED)
    if unsupported:
        raise InvalidInput(f"failed to load '{model}': the fleet does not serve {', '.join(unsupported)} "
                           f"(it applies {', '.join(sorted(APPLIED))})")
    if config.name and config.name != model:
        raise InvalidInput(f"failed to load '{model}': the configuration is for model '{config.name}'")
    platform, backend = platform_of([manifest])
    if config.platform and config.platform != platform or config.backend and config.backend != backend:
        raise InvalidInput(f"failed to load '{model}': it is served as {platform} ({backend}), the configuration "
                           f"says {config.platform or config.backend}")
    batched = manifest.batched
    _check_tensors("input", config.input, manifest.inputs, batched, model)
    _check_tensors("output", config.output, manifest.outputs, batched, model)


def instance_count(config: mc.ModelConfig) -> int | None:
    """Triton's instances of a model (each group's ``count``, 1 when unset), or None without groups."""
    if not config.instance_group:
        return None
    return sum(group.count or 1 for group in config.instance_group)


def serving_options(config: mc.ModelConfig, options: LoadOptions, built_max_batch: int, model: str, *,
                    whole: bool = False) -> LoadOptions:
    """``options`` with what ``config`` sets: ``max_batch_size`` (at most ``built_max_batch``, what the
    artifact was built for; 0: no batch dimension), dynamic batching (preferred sizes, queue delay, the
    queue's bound), the instance count as the engine's slots. ``whole``: the configuration is the
    model's whole configuration (a Triton repository's), so what it leaves out is off, as on Triton:
    no ``dynamic_batching``, no batching."""
    changes: dict = {}
    if config.max_batch_size:
        if config.max_batch_size > built_max_batch:
            raise InvalidInput(f"failed to load '{model}': max_batch_size {config.max_batch_size} is over the "
                               f"{built_max_batch} its artifact was built for")
        changes["max_batch"] = config.max_batch_size
    if config.HasField("dynamic_batching"):
        batching = config.dynamic_batching
        changes.update(dynamic_batching=True, preferred_batch_sizes=tuple(batching.preferred_batch_size))
        if batching.max_queue_delay_microseconds or whole:  # Triton's default delay is 0
            changes["max_queue_delay_us"] = batching.max_queue_delay_microseconds
        if batching.default_queue_policy.max_queue_size:
            changes["max_queue_size"] = batching.default_queue_policy.max_queue_size
    elif whole:
        changes["dynamic_batching"] = False
    if whole and not config.max_batch_size:
        changes["dynamic_batching"] = False
    if instance_count(config):
        changes["slots"] = instance_count(config)
    return dataclasses.replace(options, **changes)
