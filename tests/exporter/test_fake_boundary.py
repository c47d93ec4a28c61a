"""The fake NVML keeps to the real pynvml's surface: same functions, same parameters, same codes."""

from __future__ import annotations

import inspect
import pathlib
import re

import pynvml

import exporter
from exporter import fields as reader_module

from .fakenvml import FakeNvml


def test_every_faked_function_exists_in_pynvml_with_the_same_parameters():
    faked = [name for name in dir(FakeNvml) if name.startswith("nvml") and callable(getattr(FakeNvml, name))]
    assert len(faked) >= 35
    for name in faked:
        real = getattr(pynvml, name, None)
        assert real is not None, f"pynvml has no {name}"
        ours = list(inspect.signature(getattr(FakeNvml, name)).parameters)[1:]  # without self
        theirs = list(inspect.signature(real).parameters)
        assert ours == theirs, f"{name}: fake takes {ours}, pynvml takes {theirs}"


def test_every_pynvml_function_the_exporter_calls_is_faked():
    # Every module of the package, so a call moved between modules stays covered.
    modules = pathlib.Path(exporter.__file__).parent.glob("*.py")
    called = {name for path in modules for name in re.findall(r"nvml\.(nvml\w+)\(", path.read_text())}
    assert len(called) >= 30
    assert called <= set(dir(FakeNvml)), called - set(dir(FakeNvml))


def test_the_codes_and_constants_the_reader_relies_on_are_pynvml_s():
    assert reader_module.ERROR_NOT_SUPPORTED == pynvml.NVML_ERROR_NOT_SUPPORTED
    assert reader_module.ERROR_NOT_FOUND == pynvml.NVML_ERROR_NOT_FOUND
    assert reader_module.ERROR_TIMEOUT == pynvml.NVML_ERROR_TIMEOUT
    assert reader_module.ERROR_FUNCTION_NOT_FOUND == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    assert reader_module.ERROR_GPU_IS_LOST == pynvml.NVML_ERROR_GPU_IS_LOST
    assert reader_module.ERROR_RESET_REQUIRED == pynvml.NVML_ERROR_RESET_REQUIRED
    assert reader_module.GPU_UTILIZATION_SAMPLES == pynvml.NVML_GPU_UTILIZATION_SAMPLES
    assert reader_module.MEMORY_UTILIZATION_SAMPLES == pynvml.NVML_MEMORY_UTILIZATION_SAMPLES
    assert (reader_module.CLOCK_SM, reader_module.CLOCK_MEM) == (pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM)
    assert reader_module.TEMPERATURE_GPU == pynvml.NVML_TEMPERATURE_GPU
    assert reader_module.FI_DEV_MEMORY_TEMP == pynvml.NVML_FI_DEV_MEMORY_TEMP
    assert reader_module.ECC_CORRECTED == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
    assert reader_module.ECC_UNCORRECTED == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    assert reader_module.ECC_VOLATILE == pynvml.NVML_VOLATILE_ECC
    assert reader_module.ECC_AGGREGATE == pynvml.NVML_AGGREGATE_ECC
    assert reader_module.EVENT_TYPE_XID_CRITICAL_ERROR == pynvml.nvmlEventTypeXidCriticalError
    assert reader_module.GPM_SM_UTIL == pynvml.NVML_GPM_METRIC_SM_UTIL
    assert reader_module.GPM_ANY_TENSOR_UTIL == pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL
    assert reader_module.GPM_DRAM_BW_UTIL == pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL
    # the error the reader catches is the one pynvml raises, codes included
    assert issubclass(pynvml.NVMLError_GpuIsLost, pynvml.NVMLError)
    assert pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST).value == reader_module.ERROR_GPU_IS_LOST
