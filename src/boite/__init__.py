"""boite: a hackable hypervisor that keeps each VM in VMware Workstation's layout."""

__version__ = "0.1.0"
