; An emulation failure on any KVM: jump to an address with no RAM behind it (0xd0000000,
; the PCI hole). The CPU must fetch instructions from MMIO, which KVM cannot emulate, so
; KVM_RUN ends with an internal error (emulation failure).
bits 32
org 0x100000

start:
    mov eax, 0xd0000000
    jmp eax
