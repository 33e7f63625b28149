; A guest that triple-faults: an empty IDT, then a divide by zero. #DE cannot be
; delivered (#GP), neither can #GP (#DF), nor #DF: the CPU shuts down.
bits 32
org 0x100000

start:
    lidt [idt_empty]
    xor ecx, ecx
    mov eax, 1
    div ecx
    hlt

idt_empty:
    dw 0
    dd 0
