"""Errors a user can meet. Each says the file, key or offset, what was found and what was expected."""

from __future__ import annotations


class BoiteError(Exception):
    """Base of every error boite reports to a person (the CLI prints it without a traceback)."""

    exit_status = 1


class ConfigError(BoiteError):
    """A .vmx/.vmsd/.nvram/DDB file or a config value is malformed or breaks a rule."""


class LimitError(ConfigError):
    """The box asks for more virtual hardware than boite (and VMware) allow."""


class BoxError(BoiteError):
    """The box directory is missing, locked, or in a state that forbids the operation."""


class LockError(BoxError):
    """The box is locked by another running instance."""


class DiskFormatError(BoiteError):
    """A disk file is not what it claims to be (bad header, descriptor, table, chain)."""


class DiskError(BoiteError):
    """A disk operation failed (I/O, read-only, remote storage)."""


class GuestError(BoiteError):
    """The guest did something the VM cannot continue from (triple fault, emulation failure)."""


class AccelError(BoiteError):
    """The accelerator is not available or failed (no /dev/kvm, ioctl failure)."""


class SnapshotError(BoiteError):
    """A snapshot operation failed or the snapshot tree is inconsistent."""


class ToolsError(BoiteError):
    """The guest tools channel failed: no agent, an agent that stopped answering, a
    malformed frame, or a request the agent refused."""


class NetError(BoiteError):
    """A NIC's host side cannot be attached (no TAP permission, passt missing or failed)."""


class CheckpointError(SnapshotError):
    """A .vmsn/.vmss/.vmem file, or a saved device/vCPU state in it, is malformed or does not
    fit the machine it is loaded into (the message names the file or device and the field)."""
