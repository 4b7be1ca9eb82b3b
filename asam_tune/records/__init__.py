"""Versioned, validated documents that connect the stages. Importing this needs no torch."""
from asam_tune.records.base import Record, check_writable, dump_record, load_record, parse_record, write_atomic
from asam_tune.records.fingerprint import CpuInfo, Fingerprint, GpuInfo, fingerprint_differences
from asam_tune.records.profile import (
    BatchPoint,
    ContentionPoint,
    DeviceConfig,
    DeviceProfile,
    HandoverPoint,
    LoadAverages,
    MachineLoad,
    Profile,
    ProfileSettings,
    TimingStats,
    TransferPoint,
    WorkloadDescriptor,
)
from asam_tune.records.plan import Alternative, PerturbationDevice, Plan, Predictions

__all__ = [
    "Record", "check_writable", "dump_record", "load_record", "parse_record", "write_atomic",
    "CpuInfo", "Fingerprint", "GpuInfo", "fingerprint_differences",
    "BatchPoint", "ContentionPoint", "DeviceConfig", "DeviceProfile", "HandoverPoint", "LoadAverages",
    "MachineLoad", "Profile", "ProfileSettings", "TimingStats", "TransferPoint", "WorkloadDescriptor",
    "Alternative", "PerturbationDevice", "Plan", "Predictions",
]
