; Spins forever without a single exit: only a kick from the VMM gets the vCPU out.
bits 32
org 0x100000

start:
    inc eax
    jmp start
