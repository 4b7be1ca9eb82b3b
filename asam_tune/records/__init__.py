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
from asam_tune.records.plan import (
    Alternative, ExpectedGain, PerturbationDevice, Plan, Predictions, ProfileLoad, Quality, Trade, TradeOption,
)
from asam_tune.records.rho_rule import NO_RHO_RULE, RhoRule

__all__ = [
    "Record", "check_writable", "dump_record", "load_record", "parse_record", "write_atomic",
    "CpuInfo", "Fingerprint", "GpuInfo", "fingerprint_differences",
    "BatchPoint", "ContentionPoint", "DeviceConfig", "DeviceProfile", "HandoverPoint", "LoadAverages",
    "MachineLoad", "Profile", "ProfileSettings", "TimingStats", "TransferPoint", "WorkloadDescriptor",
    "Alternative", "ExpectedGain", "PerturbationDevice", "Plan", "Predictions", "ProfileLoad", "Quality", "Trade",
    "TradeOption", "NO_RHO_RULE", "RhoRule",
]
