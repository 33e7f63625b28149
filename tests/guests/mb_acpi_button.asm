; Multiboot kernel that does what an ACPI OS does with the power button, by polling:
; place and enable the PIIX4 PM block (PCI 00:01.3: PMBA 0x40 = 0x600, PMREGMISC 0x80 =
; 1), enable the power button event (PM1_EN bit 8), wait for PWRBTN_STS (PM1_STS bit 8),
; then enter S5 through PM1a_CNT (SLP_TYP 0, as the DSDT's \_S5 says, and SLP_EN).
; What `boite stop BOX soft` asks of an ACPI guest.
bits 32
org 0x100000
%include "com1.inc"
%include "multiboot.inc"
MULTIBOOT_HEADER

PM_BASE equ 0x600

start:
    mov esp, 0x80000
    mov dx, 0xcf8
    mov eax, 0x80000b40             ; bus 0, device 1, function 3, register 0x40
    out dx, eax
    mov dx, 0xcfc
    mov eax, PM_BASE | 1
    out dx, eax
    mov dx, 0xcf8
    mov eax, 0x80000b80             ; register 0x80: PMREGMISC
    out dx, eax
    mov dx, 0xcfc
    mov al, 1
    out dx, al
    mov dx, PM_BASE + 2             ; PM1_EN
    mov ax, 0x100
    out dx, ax
    mov esi, waiting
    call puts
.poll:
    mov dx, PM_BASE                 ; PM1_STS
    in ax, dx
    test ax, 0x100
    jz .poll
    out dx, ax                      ; write 1 to clear, as an OS acknowledges the event
    mov esi, bye
    call puts
    mov dx, PM_BASE + 4             ; PM1a_CNT: SLP_TYP 0 | SLP_EN
    mov ax, 0x2000
    out dx, ax
    EXIT_WITH 0x7e                  ; only if S5 did not power the machine off

DEFINE_PUTC
DEFINE_PUTS

waiting: db "waiting for the power button", 10, 0
bye: db "power button: entering S5", 10, 0
image_end:
