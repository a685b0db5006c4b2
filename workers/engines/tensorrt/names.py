"""Every TensorRT name the backend touches, declared per version path.

``NAMES_USED[(major, lean)]`` is what that version path (compat.TrtApi plus the
builder and runner) may touch. tests/unit/test_trt_names.py checks each declaration
against the names the real binding wheel of that version exports, and checks that
the code touches nothing it did not declare (and leaves no declaration untouched).
"""

from __future__ import annotations

# Runtime path (full and lean): deserialize, inspect IO, execute.
_RUNTIME_COMMON = frozenset({
    "__version__",
    "ILogger",
    "ILogger.log",
    "ILogger.Severity.ERROR",
    "Runtime",
    "Runtime.deserialize_cuda_engine",
    "ICudaEngine.num_io_tensors",
    "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode",
    "ICudaEngine.get_tensor_dtype",
    "ICudaEngine.get_tensor_shape",
    "ICudaEngine.get_tensor_profile_shape",
    "ICudaEngine.create_execution_context",
    "TensorIOMode.INPUT",
    "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape",
    "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3",
    "nptype",
})
_RUNTIME_FULL = frozenset({"Runtime.engine_host_code_allowed"})  # version-compatible plans on full TensorRT
_RUNTIME_V1 = frozenset({"ICudaEngine.device_memory_size"})
_RUNTIME_V2 = frozenset({"ICudaEngine.device_memory_size_v2"})
# Plugin libraries (custom layers): 8.6 loads them with ctypes and then TensorRT's own plugins
# (full TensorRT only); 10.x and 11.x through the plugin registry.
_PLUGINS_V1_FULL = frozenset({"init_libnvinfer_plugins"})
_PLUGINS_V2 = frozenset({"get_plugin_registry", "IPluginRegistry.load_library", "IPluginRegistry.deregister_library"})

# Build path: parse ONNX, configure, build a serialized plan.
_BUILD_COMMON = frozenset({
    "Builder",
    "Builder.create_network",
    "Builder.create_builder_config",
    "Builder.create_optimization_profile",
    "Builder.build_serialized_network",
    "OnnxParser",
    "OnnxParser.parse_from_file",
    "OnnxParser.num_errors",
    "OnnxParser.get_error",
    "ParserError.code",
    "ParserError.desc",
    "ParserError.node",
    "NetworkDefinitionCreationFlag",
    "IBuilderConfig.set_flag",
    "IBuilderConfig.set_memory_pool_limit",
    "MemoryPoolType.WORKSPACE",
    "IBuilderConfig.add_optimization_profile",
    "IOptimizationProfile.set_shape",
    "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache",
    "IBuilderConfig.get_timing_cache",
    "ITimingCache.serialize",
    "IBuilderConfig.get_tactic_sources",
    "IBuilderConfig.set_tactic_sources",
    "TacticSource",  # members are asked for by name (tactic_sources option), see tactic_source_mask
    "IBuilderConfig.hardware_compatibility_level",
    "HardwareCompatibilityLevel.AMPERE_PLUS",
    "BuilderFlag.VERSION_COMPATIBLE",
    "BuilderFlag.EXCLUDE_LEAN_RUNTIME",
})
# Implicit INT8 with a calibrator: TensorRT 8.6 and 10.x only (11 builds Q/DQ models).
_INT8_CALIBRATOR = frozenset({
    "BuilderFlag.INT8",
    "IInt8EntropyCalibrator2",
    "IInt8EntropyCalibrator2.get_batch_size",
    "IInt8EntropyCalibrator2.get_batch",
    "IInt8EntropyCalibrator2.read_calibration_cache",
    "IInt8EntropyCalibrator2.write_calibration_cache",
    "IBuilderConfig.int8_calibrator",
})
_BUILD_V8 = _INT8_CALIBRATOR | frozenset({
    "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
    "BuilderFlag.FP16",
})
_BUILD_V10 = _INT8_CALIBRATOR | frozenset({
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY",
    "ParserError.node_name",
    "ParserError.node_operator",
})
_BUILD_V11 = frozenset({
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY",
    "ParserError.node_name",
    "ParserError.node_operator",
})

# (major, lean) -> every name that version path may touch.
NAMES_USED: dict[tuple[int, bool], frozenset[str]] = {
    (8, False): _RUNTIME_COMMON | _RUNTIME_FULL | _RUNTIME_V1 | _PLUGINS_V1_FULL | _BUILD_COMMON | _BUILD_V8,
    (10, False): _RUNTIME_COMMON | _RUNTIME_FULL | _RUNTIME_V2 | _PLUGINS_V2 | _BUILD_COMMON | _BUILD_V10,
    (11, False): _RUNTIME_COMMON | _RUNTIME_FULL | _RUNTIME_V2 | _PLUGINS_V2 | _BUILD_COMMON | _BUILD_V11,
    (8, True): _RUNTIME_COMMON | _RUNTIME_V1,
    (10, True): _RUNTIME_COMMON | _RUNTIME_V2 | _PLUGINS_V2,
    (11, True): _RUNTIME_COMMON | _RUNTIME_V2 | _PLUGINS_V2,
}
