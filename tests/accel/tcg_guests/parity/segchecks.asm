; Data-segment checks on access, against the real CPU through KVM (QEMU TCG does not
; make them): reads through a read-only segment work and writes are #GP(0), an access
; crossing a byte-granular limit, an access at or below an expand-down segment's limit,
; and any access through a null selector are #GP(0). Handlers jump on (no IRET).
%define EXIT_CODE 0x54
%define NO_IRET
%include "lib.inc"

%define SEL_RODATA  0x30
%define SEL_SMALL   0x38            ; data, limit 0xfff, byte granular
%define SEL_DOWN    0x40            ; expand-down data, limit 0xfff (valid: 0x1000..4G)

main:
    mov dword [gdt + SEL_RODATA], 0x0000FFFF
    mov dword [gdt + SEL_RODATA + 4], 0x00CF9000
    mov dword [gdt + SEL_SMALL], 0x00000FFF
    mov dword [gdt + SEL_SMALL + 4], 0x00409200
    mov dword [gdt + SEL_DOWN], 0x00000FFF
    mov dword [gdt + SEL_DOWN + 4], 0x00409600
    mov ax, SEL_RODATA
    mov es, ax
    mov eax, [es:bounds]            ; reading is fine
    SHOW "ro read", eax
    call nl
    RESUME .ro
    mov dword [es:0x200000], 1      ; #GP(0)
.ro:
    mov ax, SEL_SMALL
    mov fs, ax
    mov eax, [fs:0xffc]
    RESUME .lim
    mov eax, [fs:0xffd]             ; crosses the limit: #GP(0)
.lim:
    mov ax, SEL_DOWN
    mov gs, ax
    mov eax, [gs:0x1000]            ; expand-down: above the limit is valid
    RESUME .down
    mov eax, [gs:0xff0]             ; at or below the limit: #GP(0)
.down:
    xor eax, eax
    mov gs, ax
    RESUME .null
    mov eax, [gs:0]                 ; null selector: #GP(0)
.null:
    mov ax, SEL_KDATA
    mov es, ax
    mov fs, ax
    mov gs, ax
    ret

align 4
bounds: dd 5, 10
END_IMAGE
