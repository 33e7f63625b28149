; Protected -> real -> protected mode, twice, without a BIOS: through a 16-bit protected
; mode segment (16-bit stack ops, CS), CR0.PE cleared, a far jump to real mode, real-mode
; segment arithmetic (seg << 4 + offset, aliasing), "unreal" FS keeping its 4 GiB cached
; limit for 32-bit addressing, INT n and #DE through our own IVT (FLAGS/CS/IP pushed,
; IF cleared), a far CALL/RETF between segments, PUSH SP, 32-bit operand and address
; prefixes in 16-bit code, SMSW; then CR0.PE set and a far jump back to 32-bit code.
%define EXIT_CODE 0x47
%include "lib.inc"

%define RM_BASE     0x7000
%define SEL_CODE16  0x30
%define SEL_DATA16  0x38

main:
    mov dword [gdt + SEL_CODE16], 0x0000FFFF      ; 16-bit code, base 0, limit 64 KiB
    mov dword [gdt + SEL_CODE16 + 4], 0x00009A00
    mov dword [gdt + SEL_DATA16], 0x0000FFFF      ; 16-bit data, base 0, limit 64 KiB
    mov dword [gdt + SEL_DATA16 + 4], 0x00009200
    mov esi, section..rm16.start
    mov edi, RM_BASE
    mov ecx, rm_end - rm_start
    rep movsb
    mov eax, [idt_desc]             ; the protected-mode IDTR, reachable from real mode
    mov [pm_idt], eax
    mov ax, [idt_desc + 4]
    mov [pm_idt + 4], ax
    ; IVT entries of our own (the firmware's table is not used)
    mov dword [0x60 * 4], rm_int60
    mov dword [0 * 4], rm_de
    mov ecx, 2
rm_round:
    push ecx
    PRINT `to real mode\n`
    mov [saved_esp], esp
    mov ax, SEL_KDATA               ; FS: flat 4 GiB, kept for unreal mode
    mov fs, ax
    jmp SEL_CODE16:rm_entry
pm_back:
    mov ax, SEL_KDATA
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    mov esp, [saved_esp]
    PRINT `back in protected mode\n`
    mov esi, rm_rec
    mov ecx, (rm_rec_end - rm_rec) / 4
.show:
    lodsd
    call hex32
    call sp_
    loop .show
    call nl
    mov eax, cr0
    SHOW "cr0", eax
    call nl
    pop ecx
    dec ecx
    jnz rm_round
    ret

saved_esp: dd 0

section .rm16 follows=.text vstart=RM_BASE align=16
bits 16
rm_start:
rm_entry:                           ; 16-bit protected mode, CPL 0
    mov ax, SEL_DATA16
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x6ff0
    mov ax, cs
    mov [rec_cs16], ax
    push word 0x1234                ; 16-bit stack ops
    pop bx
    mov [rec_push16], bx
    lidt [rm_ivt]
    mov eax, cr0
    and eax, ~1
    mov cr0, eax
    jmp 0:.real
.real:
    xor ax, ax
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov sp, 0x6ff0
    mov si, rm_hello
    call rm_puts
    smsw ax
    mov [rec_msw], ax
    ; segment arithmetic: 1234:0010 and 1000:2350 are the same byte
    mov ax, 0x1234
    mov es, ax
    mov word [es:0x0010], 0xbeef
    mov ax, 0x1000
    mov es, ax
    mov ax, [es:0x2350]
    mov [rec_alias], ax
    ; unreal FS: 32-bit address through the cached 4 GiB limit
    mov eax, [fs:dword 0x100000]    ; the multiboot magic at 1 MiB
    mov [rec_unreal], eax
    ; INT through our IVT: handler adds 1 to AX, reports IF
    sti
    mov ax, 41
    int 0x60
    mov [rec_int], ax
    cli
    ; #DE through IVT[0]: the handler reports the pushed IP and skips the DIV
    xor bx, bx
    mov ax, 7
.div:
    div bx
    mov ax, .div
    mov [rec_de_want], ax
    ; far call to segment 0x0700 (same code, other CS)
    call 0x0700:(rm_far - 0x7000)
    ; PUSH SP pushes the value before the push
    mov bx, sp
    push sp
    pop ax
    sub bx, ax
    mov [rec_pushsp], bx
    ; 32-bit arithmetic in 16-bit code
    mov ecx, 100
    xor eax, eax
.sum:
    add eax, ecx
    loop .sum, ecx                  ; a32 loop on ECX
    imul eax, eax, 1000
    mov [rec_sum], eax
    ; back to protected mode
    o32 lidt [pm_idt]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    jmp dword SEL_KCODE:pm_back

rm_far:
    mov ax, cs
    mov [cs:rec_farcs - 0x7000], ax
    retf

rm_int60:                           ; INT 0x60: AX += 1, record FLAGS.IF inside and pushed
    inc ax
    push ax
    pushf
    pop ax
    and ax, 0x200
    mov [rec_int_if], ax
    mov bp, sp
    mov ax, [bp + 6]                ; the pushed FLAGS (above AX, IP, CS)
    and ax, 0x200
    mov [rec_int_saved_if], ax
    pop ax
    iret

rm_de:
    push bp
    mov bp, sp
    mov ax, [bp + 2]                ; pushed IP: the DIV itself
    mov [rec_de_ip], ax
    add word [bp + 2], 2            ; skip "div bx"
    pop bp
    iret

rm_putc:
    push dx
    push ax
    mov dx, COM1 + 5
.w: in al, dx
    test al, 0x20
    jz .w
    pop ax
    mov dx, COM1
    out dx, al
    pop dx
    ret
rm_puts:
    lodsb
    test al, al
    jz .e
    call rm_putc
    jmp rm_puts
.e: ret

rm_hello: db "hello from real mode", 10, 0
align 4
rm_ivt: dw 0x3ff
        dd 0
pm_idt: dw 0
        dd 0
align 4
rm_rec:
rec_cs16: dd 0
rec_push16: dd 0
rec_msw: dd 0
rec_alias: dd 0
rec_unreal: dd 0
rec_int: dd 0
rec_int_if: dd 0
rec_int_saved_if: dd 0
rec_de_ip: dd 0
rec_de_want: dd 0
rec_farcs: dd 0
rec_pushsp: dd 0
rec_sum: dd 0
rm_rec_end:
rm_end:

section .tail follows=.rm16
align 4
image_end:
