; Bare-metal compute loop for bench/emu.py: integer, memory and string work, a few
; hundred instructions per outer iteration. A multiboot (a.out kludge) image loaded at
; 1 MiB, so QEMU's -kernel runs the same bytes the emulator runs. At the end it writes
; the checksum to COM1 in hex and exits through isa-debug-exit (port 0xf4) with 0x31.
; ITER (define) sets the outer iteration count.
bits 32
org 0x100000
%ifndef ITER
%define ITER 2000
%endif
MB_MAGIC equ 0x1BADB002
MB_FLAGS equ 0x00010000
    jmp start                     ; so a loader that enters at the load address works too
align 4
header:
    dd MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    dd header, 0x100000, end_of_image, end_of_bss, start
start:
    mov esp, 0x90000
    cld
    xor ebp, ebp                  ; checksum
    mov ebx, ITER
outer:
    ; integer: xorshift32 + multiply-accumulate, 24 rounds
    mov eax, ebx
    or eax, 1
    mov ecx, 24
.int:
    mov edx, eax
    shl edx, 13
    xor eax, edx
    mov edx, eax
    shr edx, 17
    xor eax, edx
    mov edx, eax
    shl edx, 5
    xor eax, edx
    imul edx, eax, 37
    add ebp, edx
    dec ecx
    jnz .int
    ; memory: fill and sum a 32-dword array with indexed addressing
    mov edi, array
    xor ecx, ecx
.fill:
    lea edx, [ecx + ebx]
    mov [edi + ecx * 4], edx
    inc ecx
    cmp ecx, 32
    jb .fill
    xor ecx, ecx
    xor eax, eax
.sum:
    add eax, [edi + ecx * 4]
    adc eax, 0
    inc ecx
    cmp ecx, 32
    jne .sum
    add ebp, eax
    ; string: copy the array, then compare with byte loads
    mov esi, array
    mov edi, copy
    mov ecx, 32
    rep movsd
    mov esi, array
    mov edi, copy
    mov ecx, 16
.cmp:
    lodsb
    cmp al, [edi]
    jne bad
    inc edi
    loop .cmp
    ; a call and stack traffic
    push ebx
    call mix
    pop ebx
    dec ebx
    jnz outer
    ; print checksum
    mov edx, 8
.hex:
    rol ebp, 4
    mov eax, ebp
    and eax, 15
    mov al, [digits + eax]
    call putc
    dec edx
    jnz .hex
    mov al, 10
    call putc
    mov al, 0x31
    out 0xf4, al
    hlt
bad:
    mov al, 0x7f
    out 0xf4, al
    hlt
mix:
    mov eax, [esp + 4]
    movzx ecx, al
    bswap eax
    xor ebp, eax
    add ebp, ecx
    ret
putc:
    push edx
    mov ah, al
    mov dx, 0x3fd
.w: in al, dx
    test al, 0x20
    jz .w
    mov al, ah
    mov dx, 0x3f8
    out dx, al
    pop edx
    ret
digits: db "0123456789abcdef"
align 4096, db 0
end_of_image:
array: times 32 dd 0
copy: times 32 dd 0
end_of_bss:
