; A multiboot (v1) test kernel: reports on COM1 what its loader handed over, then ends
; through isa-debug-exit (port 0xf4) with 0x21, i.e. exit status 0x43.
; Built two ways: `nasm -f bin -DAOUT` (the a.out kludge: header address fields) and
; `nasm -f elf32` + `ld -m elf_i386 -Ttext=0x100000` (an ELF kernel).
bits 32

MB_MAGIC  equ 0x1BADB002
%ifdef AOUT
MB_FLAGS  equ 0x00010003        ; align modules, memory info, address fields valid
LOAD_ADDR equ 0x100000
          org LOAD_ADDR
%else
MB_FLAGS  equ 0x00000003
          section .text
          global _start
%endif
COM1      equ 0x3f8

          align 4
mb_header:
          dd MB_MAGIC
          dd MB_FLAGS
          dd -(MB_MAGIC + MB_FLAGS)
%ifdef AOUT
          dd mb_header          ; header_addr
          dd LOAD_ADDR          ; load_addr
          dd load_end           ; load_end_addr
          dd bss_end            ; bss_end_addr
          dd _start             ; entry_addr
%endif

_start:
          mov esp, stack_top
          cmp eax, 0x2BADB002
          jne .bad
          mov ebp, ebx                  ; the multiboot information
          mov esi, s_ok
          call puts
          mov esi, s_flags
          mov eax, [ebp + 0]
          call field
          mov esi, s_lower
          mov eax, [ebp + 4]
          call field
          mov esi, s_upper
          mov eax, [ebp + 8]
          call field
          mov esi, s_cmdline
          call puts
          mov esi, [ebp + 16]
          call puts
          call newline
          mov esi, s_mods
          mov eax, [ebp + 20]
          call field
          cmp dword [ebp + 20], 0
          je .no_mods
          mov ebx, [ebp + 24]           ; first module entry
          mov esi, s_mod0
          call puts
          mov esi, [ebx]
          mov ecx, [ebx + 4]
          sub ecx, esi
          call putn                     ; the module's bytes
          call newline
          mov esi, s_modcmd
          call puts
          mov esi, [ebx + 8]
          call puts
          call newline
          mov esi, s_modalign
          mov eax, [ebx]
          and eax, 0xfff
          call field
.no_mods:
          mov esi, s_loader
          call puts
          mov esi, [ebp + 64]
          call puts
          call newline
          mov esi, s_mmap                ; entries with a base below 4 GiB
          call puts
          mov ebx, [ebp + 48]
          mov edi, ebx
          add edi, [ebp + 44]
.mmap:
          cmp ebx, edi
          jae .mmap_done
          mov eax, [ebx + 4]
          call puthex
          mov al, '+'
          call putc
          mov eax, [ebx + 12]
          call puthex
          mov al, ':'
          call putc
          mov eax, [ebx + 20]
          add eax, '0'
          call putc
          mov al, ' '
          call putc
          add ebx, [ebx]
          add ebx, 4
          jmp .mmap
.mmap_done:
          call newline
          mov esi, s_bss
          mov eax, [bss_canary]
          call field
          mov al, 0x21
          out 0xf4, al
          hlt
.bad:
          mov al, 0x01
          out 0xf4, al
          hlt

; "name" then EAX in hex and a newline
field:
          push eax
          call puts
          pop eax
          call puthex
newline:
          mov al, 10
putc:
          push edx
          push eax
          mov dx, COM1 + 5
.wait:
          in al, dx
          test al, 0x20
          jz .wait
          pop eax
          mov dx, COM1
          out dx, al
          pop edx
          ret
puts:                                   ; ESI: NUL-terminated string
          lodsb
          test al, al
          jz .done
          call putc
          jmp puts
.done:
          ret
putn:                                   ; ESI, ECX bytes (at most 64)
          cmp ecx, 64
          jbe .go
          mov ecx, 64
.go:
          jecxz .done
.next:
          lodsb
          call putc
          loop .next
.done:
          ret
puthex:                                 ; EAX as 8 hex digits
          push ecx
          push eax
          mov ecx, 8
.digit:
          rol eax, 4
          push eax
          and al, 0x0f
          add al, '0'
          cmp al, '9'
          jbe .out
          add al, 'a' - '0' - 10
.out:
          call putc
          pop eax
          loop .digit
          pop eax
          pop ecx
          ret

s_ok      db "multiboot ok", 10, 0
s_flags   db "flags=", 0
s_lower   db "mem_lower=", 0
s_upper   db "mem_upper=", 0
s_cmdline db "cmdline=", 0
s_mods    db "mods=", 0
s_mod0    db "mod0=", 0
s_modcmd  db "mod0cmd=", 0
s_modalign db "mod0align=", 0
s_loader  db "loader=", 0
s_mmap    db "mmap=", 0
s_bss     db "bss=", 0

%ifdef AOUT
          align 4
load_end:
bss_canary equ load_end
stack_top equ load_end + 0x2000
bss_end   equ stack_top
%else
          section .bss
          alignb 16
bss_canary resd 1
stack:    resb 0x2000
stack_top:
%endif
