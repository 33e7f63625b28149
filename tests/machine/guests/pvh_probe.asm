; A PVH test kernel: an i386 ELF whose Xen note (XEN_ELFNOTE_PHYS32_ENTRY) names its
; 32-bit entry. It reports on COM1 what hvm_start_info (EBX) holds, then ends through
; isa-debug-exit with 0x21 (exit status 0x43).
; Build: nasm -f elf32 pvh_probe.asm && ld -m elf_i386 -T pvh_probe.ld
%include "probe_io.inc"
bits 32

        section .note.Xen note alloc noexec nowrite align=4
        dd 4                            ; namesz
        dd 4                            ; descsz
        dd 18                           ; XEN_ELFNOTE_PHYS32_ENTRY
        db "Xen", 0
        dd pvh_entry

        section .text
        global pvh_entry
pvh_entry:
        mov esp, stack_top
        mov ebp, ebx
        mov esi, s_ok
        call puts32
        mov esi, s_magic
        call puts32
        mov eax, [ebp + 0]
        call puthex32
        mov esi, s_version
        call puts32
        mov eax, [ebp + 4]
        call puthex32
        mov esi, s_cmdline
        call puts32
        mov esi, [ebp + 24]             ; cmdline_paddr (low half)
        call puts32
        mov esi, s_nl
        call puts32
        mov esi, s_mods
        call puts32
        mov eax, [ebp + 12]
        call puthex32
        cmp dword [ebp + 12], 0
        je .no_mods
        mov edi, [ebp + 16]             ; modlist_paddr (low half)
        mov esi, s_mod0
        call puts32
        mov esi, [edi]
        mov ecx, [edi + 8]
        call putn32
        mov esi, s_nl
        call puts32
.no_mods:
        mov esi, s_memmap
        call puts32                     ; entries with a base below 4 GiB: base+size:type
        mov edi, [ebp + 40]             ; memmap_paddr
        mov ebp, [ebp + 48]             ; memmap_entries
.entry:
        test ebp, ebp
        jz .done
        mov eax, [edi]
        call hex_only
        mov al, '+'
        call putc32
        mov eax, [edi + 8]
        call hex_only
        mov al, ':'
        call putc32
        mov al, [edi + 16]
        add al, '0'
        call putc32
        mov al, ' '
        call putc32
        add edi, 24
        dec ebp
        jmp .entry
.done:
        mov al, 10
        call putc32
        mov al, 0x21
        out 0xf4, al
        hlt

hex_only:                               ; EAX as 8 hex digits
        mov ebx, eax
        mov ecx, 8
.digit: rol ebx, 4
        mov al, bl
        and al, 0x0f
        add al, '0'
        cmp al, '9'
        jbe .out
        add al, 'a' - '0' - 10
.out:   call putc32
        dec ecx
        jnz .digit
        ret

        PROBE_IO 32

        section .rodata
s_ok      db "pvh ok", 10, 0
s_magic   db "magic=", 0
s_version db "version=", 0
s_cmdline db "cmdline=", 0
s_mods    db "modules=", 0
s_mod0    db "mod0=", 0
s_memmap  db "memmap=", 0
s_nl      db 10, 0

        section .bss
        alignb 16
        resb 0x1000
stack_top:
