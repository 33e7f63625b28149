; Multiboot kernel that ends in `cli; hlt`, as Linux's power-off does without ACPI.
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

start:
    mov esp, 0x80000
    mov al, '.'
    call putc
    cli
.park:
    hlt
    jmp .park

DEFINE_PUTC
image_end:
