; What the multiboot loader hands over, printed: EAX, the boot information (flags,
; mem_lower/upper, the command line, the memory map), EFLAGS, CR0 and the segment
; registers at entry. Same loader under both accelerators: the CPU state it sets must be
; the same too.
%define EXIT_CODE 0x51
%define NO_IRET
%include "lib.inc"

main:
    SHOW "eax", [mb_eax]
    mov eax, [mb_eflags]
    and eax, 0x3f7fd7
    SHOW "eflags", eax
    mov eax, cr0
    SHOW "cr0", eax
    call nl
    mov ebx, [mb_ebx]
    mov eax, [ebx]
    SHOW "flags", eax
    test dword [ebx], 1
    jz .nomem
    SHOW "mem_lower", [ebx + 4]
    SHOW "mem_upper", [ebx + 8]
.nomem:
    call nl
    test dword [ebx], 4
    jz .nocmd
    PRINT "cmdline="
    mov esi, [ebx + 16]
    call puts
    call nl
.nocmd:
    test dword [ebx], 0x40
    jz .nommap
    mov esi, [ebx + 48]             ; mmap_addr
    mov edi, esi
    add edi, [ebx + 44]             ; mmap_length
.entry:
    cmp esi, edi
    jae .nommap
    PRINT "mmap "
    mov eax, [esi + 8]
    call hex32
    mov eax, [esi + 4]
    call hex32
    call sp_
    mov eax, [esi + 16]
    call hex32
    mov eax, [esi + 12]
    call hex32
    call sp_
    mov eax, [esi + 20]
    call hex8
    call nl
    add esi, [esi]
    add esi, 4
    jmp .entry
.nommap:
    ret
END_IMAGE
