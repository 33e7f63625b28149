"""Firmware: SeaBIOS and what it reads through fw_cfg.

`seabios.py` maps the BIOS image; `acpi.py` + `aml.py` build the ACPI tables and the
table-loader script; `smbios.py` the SMBIOS structures; `pc.py` fills fw_cfg (e820,
bootorder, sercon port, ACPI, SMBIOS) for a machine that boots through the firmware.
"""
