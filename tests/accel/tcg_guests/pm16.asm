; 16-bit protected mode: code in a 16-bit segment, interrupts through 16-bit interrupt
; and trap gates (6-byte frames, IRET without 0x66), through a 32-bit gate from 16-bit
; code (12-byte frame), a 16-bit call gate (CS:IP pushed as words), a fault in 16-bit
; code handled by the 32-bit handler, 32-bit operands and addresses by prefix, and a far
; jump back to 32-bit code.
%define EXIT_CODE 0x4d
%include "lib.inc"

%define PM16_BASE   0x8000
%define SEL_CODE16  0x30
%define SEL_DATA16  0x38
%define SEL_CGATE16 0x40

main:
    mov dword [gdt + SEL_CODE16], 0x0000FFFF
    mov dword [gdt + SEL_CODE16 + 4], 0x00009A00
    mov dword [gdt + SEL_DATA16], 0x0000FFFF      ; 16-bit (B=0) data, 4 GiB: the 32-bit
    mov dword [gdt + SEL_DATA16 + 4], 0x008F9200  ; handlers reach their data through it
    ; 16-bit call gate -> SEL_CODE16:cg16
    mov dword [gdt + SEL_CGATE16], (SEL_CODE16 << 16)
    mov word [gdt + SEL_CGATE16], cg16
    mov dword [gdt + SEL_CGATE16 + 4], 0x00008400
    mov esi, section..pm16.start
    mov edi, PM16_BASE
    mov ecx, pm16_end - pm16_start
    rep movsb
    ; 16-bit gates: 0x50 interrupt, 0x51 trap; 0x52 a 32-bit interrupt gate
    mov word [idt + 0x50 * 8], h16
    mov word [idt + 0x50 * 8 + 2], SEL_CODE16
    mov dword [idt + 0x50 * 8 + 4], 0x00008600
    mov word [idt + 0x51 * 8], h16
    mov word [idt + 0x51 * 8 + 2], SEL_CODE16
    mov dword [idt + 0x51 * 8 + 4], 0x00008700
    mov word [idt + 0x52 * 8], h16_32
    mov word [idt + 0x52 * 8 + 2], SEL_CODE16
    mov dword [idt + 0x52 * 8 + 4], 0x00008e00
    mov [saved_esp], esp
    mov dword [resume], pm16_entry.after_ud     ; the #UD below returns there
    jmp SEL_CODE16:pm16_entry
back32:
    mov ax, SEL_KDATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, [saved_esp]
    PRINT `back in 32-bit code\n`
    mov esi, rec
    mov ecx, (rec_end - rec) / 4
.show:
    lodsd
    call hex32
    call sp_
    loop .show
    call nl
    ret

saved_esp: dd 0

section .pm16 follows=.text vstart=PM16_BASE align=16
bits 16
pm16_start:
pm16_entry:
    mov ax, SEL_DATA16
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, 0x7ff0                 ; upper half clear: SP and ESP agree
    sti
    mov [sp_before], sp
    int 0x50
    mov ax, [sp_in]
    mov [rec_sp_int16], ax
    mov ax, [fl_in]
    mov [rec_if_int16], ax
    int 0x51
    mov ax, [fl_in]
    mov [rec_if_trap16], ax
    int 0x52
    mov ax, [sp_in]
    mov [rec_sp_int32], ax
    cli
    call SEL_CGATE16:0
    mov ax, [sp_in]
    mov [rec_sp_cg16], ax
    mov ax, [cs_in]
    mov [rec_cs_cg16], ax
    ud2                             ; the 32-bit handler prints it, returns after
.after_ud:
    mov eax, 0x12345678             ; 32-bit operand by prefix
    mov ebx, 0x40
    mov [ebx + ebx * 2 + rec_sum - 0xc0], eax   ; 32-bit address by prefix
    jmp dword SEL_KCODE:back32

h16:                                ; 16-bit gate: FLAGS, CS, IP as words
    push bp
    mov bp, sp
    mov ax, [sp_before]
    sub ax, bp
    sub ax, 2
    mov [sp_in], ax                 ; bytes the CPU pushed
    pushf
    pop ax
    and ax, 0x200
    mov [fl_in], ax
    pop bp
    iret

h16_32:                             ; 32-bit gate into 16-bit code: EFLAGS, CS, EIP
    push bp
    mov bp, sp
    mov ax, [sp_before]
    sub ax, bp
    sub ax, 2
    mov [sp_in], ax
    pop bp
    o32 iret

cg16:
    mov bp, sp
    mov ax, [sp_before]
    sub ax, bp
    mov [sp_in], ax
    mov ax, [bp + 2]                ; the caller's CS
    mov [cs_in], ax
    retf

sp_before: dw 0
sp_in: dw 0
fl_in: dw 0
cs_in: dw 0
align 4
rec:
rec_sp_int16: dd 0
rec_if_int16: dd 0
rec_if_trap16: dd 0
rec_sp_int32: dd 0
rec_sp_cg16: dd 0
rec_cs_cg16: dd 0
rec_sum: dd 0
rec_end:
pm16_end:

section .tail follows=.pm16
align 4
image_end:
