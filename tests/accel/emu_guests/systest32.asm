; System-level checks printed to COM1, run the same under QEMU TCG and boite's emulator:
; exceptions with error codes (#DE #UD #GP #NP #PF), CR2, 2-level paging with 4 KiB and
; PSE 4 MiB pages, accessed/dirty bits, CR0.WP, INVLPG, CR3 reload, a ring-3 task entered
; with IRET, the TSS stack switch on INT 0x80 from ring 3, faults at CPL 3 and IRET back
; to ring 3. Exits through isa-debug-exit with 0x31.
bits 32
org 0x100000
MB_MAGIC equ 0x1BADB002
MB_FLAGS equ 0x00010000
    jmp start
align 4
header:
    dd MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    dd header, 0x100000, end_of_image, end_of_bss, start

%define PD      0x300000
%define PT0     0x301000
%define PT1     0x302000
%define KSTACK  0x280000
%define USTACK  0x290000

start:
    mov esp, KSTACK
    lgdt [gdt_desc]
    jmp 0x08:.cs
.cs:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax
    ; IDT: every vector to its stub; vector 0x80 is a DPL 3 trap gate
    xor ecx, ecx
.idt:
    mov eax, ecx
    shl eax, 4
    add eax, stubs
    mov edx, eax
    and eax, 0xffff
    or eax, 0x00080000
    and edx, 0xffff0000
    or edx, 0x8e00
    cmp ecx, 0x80
    jne .notsys
    or edx, 0x6100               ; DPL 3, 32-bit trap gate (0xef00)
.notsys:
    mov [idt + ecx * 8], eax
    mov [idt + ecx * 8 + 4], edx
    inc ecx
    cmp ecx, 256
    jne .idt
    lidt [idt_desc]
    ; TSS: esp0/ss0 for ring-3 -> ring-0 transitions
    mov dword [tss + 4], KSTACK
    mov dword [tss + 8], 0x10
    mov eax, tss
    mov [gdt + 0x28 + 2], ax
    shr eax, 16
    mov [gdt + 0x28 + 4], al
    mov [gdt + 0x28 + 7], ah
    mov ax, 0x28
    ltr ax

    ; --- exceptions without paging
    mov dword [resume], .after_de
    xor ecx, ecx
    mov eax, 1
    div ecx
.after_de:
    mov dword [resume], .after_ud
    ud2
.after_ud:
    mov dword [resume], .after_gp
    mov ax, 0x7b                 ; beyond the GDT limit
    mov ds, ax
.after_gp:
    mov dword [resume], .after_np
    mov ax, 0x38                 ; a not-present data segment
    mov es, ax
.after_np:
    mov ax, 0x10
    mov ds, ax
    mov es, ax

    ; --- paging: PT0 identity 0..4 MiB (4 KiB pages), PDE 1 = PSE 4 MiB page at 4 MiB,
    ; PDE 256 (0x40000000) -> PT1 whose page 0 is the physical page `alias`
    mov edi, PT0
    mov eax, 0x007                ; present | writable | user
    mov ecx, 1024
.fill:
    mov [edi], eax
    add eax, 0x1000
    add edi, 4
    loop .fill
    mov edi, PD
    xor eax, eax
    mov ecx, 1024
    rep stosd
    mov dword [PD + 0], PT0 | 7
    mov dword [PD + 4], 0x400000 | 0x87      ; PSE page, present, writable, user
    mov dword [PD + 256 * 4], PT1 | 7
    mov eax, alias
    or eax, 7
    mov [PT1], eax
    mov eax, ropage                          ; read-only page
    shr eax, 12
    and dword [PT0 + eax * 4], ~2
    mov eax, kpage                           ; supervisor-only page
    shr eax, 12
    and dword [PT0 + eax * 4], ~4
    mov eax, cr4
    or eax, 0x10                             ; PSE
    mov cr4, eax
    mov eax, PD
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80010000                       ; PG | WP
    mov cr0, eax
    jmp .paged
.paged:
    ; alias write, then the PTE's accessed/dirty bits
    mov dword [0x40000000 + 0x10], 0xabcd1234
    mov eax, [alias + 0x10]
    call puthex
    mov eax, [PT1]
    and eax, 0x60
    call puthex
    ; PSE page: write at 4 MiB + 8 through the 4 MiB mapping, A/D in the PDE
    mov dword [0x400008], 0x55aa55aa
    mov eax, [PD + 4]
    and eax, 0xe7
    call puthex
    ; INVLPG: remap the alias to `alias2`, flush, read
    mov eax, alias2
    or eax, 7
    mov [PT1], eax
    invlpg [0x40000000]
    mov eax, [0x40000000]
    call puthex
    mov al, 10
    call putc
    ; #PF: write to a read-only page with WP=1 (error 3), read/write unmapped (0 / 2)
    mov dword [resume], .after_pf1
    mov dword [ropage], 1
.after_pf1:
    mov dword [resume], .after_pf2
    mov eax, [0x80000000]
.after_pf2:
    mov dword [resume], .after_pf3
    mov dword [0x80001004], 7
.after_pf3:
    ; CR3 reload flushes the TLB: unmap the alias page, reload, fault on it
    mov dword [PT1], 0
    mov eax, cr3
    mov cr3, eax
    mov dword [resume], .after_pf4
    mov eax, [0x40000000]
.after_pf4:

    ; --- ring 3: IRET into user code. DS/ES/FS/GS get the user data segment first: IRET
    ; to ring 3 nulls the DPL 0 ones, and accesses through a null selector are #GP(0) on
    ; a real CPU (QEMU TCG does not check; the handlers below use DS as they find it).
    mov ax, 0x23
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    push 0x23                 ; ss
    push USTACK               ; esp
    push 0x002                ; eflags: IF off (the firmware's PIT must not interrupt)
    push 0x1b                 ; cs
    push user_code            ; eip
    iret

user_code:
    int 0x80                  ; syscall: prints the user CS, handler stack depth, user ESP
    mov dword [resume], .u1
    mov eax, [kpage]          ; #PF from user on a supervisor page (error 5)
.u1:
    mov dword [resume], .u2
    cli                       ; #GP(0): CPL 3 > IOPL 0
.u2:
    mov dword [resume], .u3
    int 0x81                  ; #GP: gate DPL 0 < CPL 3, error (0x81 << 3) | 2
.u3:
    mov dword [resume], .u4
    mov eax, cr0              ; #GP(0): privileged at CPL 3
.u4:
    int 0x80                  ; second syscall: back to the kernel for good

back_in_kernel:
    mov esi, done_msg
    call puts
    mov al, 0x31
    out 0xf4, al
    hlt

; ---------------------------------------------------------------- handlers
; stub v: push a fake error code when the CPU pushes none, push v, jump to common
%macro STUB 1
align 16
%if %1 = 8 || (%1 >= 10 && %1 <= 14) || %1 = 17
    push dword %1
    jmp exc_common
%else
    push dword 0
    push dword %1
    jmp exc_common
%endif
%endmacro
align 16
stubs:
%assign v 0
%rep 256
    STUB v
%assign v v+1
%endrep

exc_common:
    ; stack: vector, error, eip, cs, eflags [, esp, ss]
    cmp dword [esp], 0x80
    je syscall_entry
    mov esi, exc_msg
    call puts
    mov eax, [esp]            ; vector
    call puthex
    mov eax, [esp + 4]        ; error code
    call puthex
    mov eax, [esp + 8]        ; faulting EIP relative to the image
    sub eax, 0x100000
    call puthex
    mov eax, [esp + 12]       ; CS (its RPL shows the interrupted ring)
    call puthex
    mov eax, cr2
    cmp dword [esp], 14
    je .cr2
    xor eax, eax
.cr2:
    call puthex
    mov al, 10
    call putc
    mov eax, [resume]
    mov [esp + 8], eax
    add esp, 8
    iret

syscall_entry:
    mov esi, sys_msg
    call puts
    mov eax, [esp + 12]       ; user CS
    call puthex
    mov eax, KSTACK           ; kernel stack depth
    sub eax, esp
    call puthex
    mov eax, [esp + 20]       ; user ESP saved by the stack switch
    call puthex
    mov al, 10
    call putc
    inc dword [syscalls]
    cmp dword [syscalls], 2
    je .exit
    add esp, 8
    iret
.exit:
    mov esp, KSTACK
    jmp back_in_kernel

; ---------------------------------------------------------------- output
putc:
    push edx
    push eax
    mov ah, al
    mov dx, 0x3fd
.w: in al, dx
    test al, 0x20
    jz .w
    mov al, ah
    mov dx, 0x3f8
    out dx, al
    pop eax
    pop edx
    ret
puts:
    push eax
.l: lodsb
    test al, al
    jz .e
    call putc
    jmp .l
.e: pop eax
    ret
puthex:                           ; EAX as 8 hex digits and a space
    push ecx
    push ebx
    mov ecx, 8
.h: rol eax, 4
    mov ebx, eax
    and ebx, 15
    push eax
    mov al, [digits + ebx]
    call putc
    pop eax
    loop .h
    mov al, ' '
    call putc
    pop ebx
    pop ecx
    ret

digits: db "0123456789abcdef"
exc_msg: db "exc ", 0
sys_msg: db "sys ", 0
done_msg: db "done", 10, 0
align 8
gdt:
    dq 0
    dq 0x00CF9A000000FFFF         ; 0x08 kernel code
    dq 0x00CF92000000FFFF         ; 0x10 kernel data
    dq 0x00CFFA000000FFFF         ; 0x18 user code (DPL 3)
    dq 0x00CFF2000000FFFF         ; 0x20 user data (DPL 3)
    dq 0x0000890000000067         ; 0x28 TSS (base patched)
    dq 0x00CF92000000FFFF         ; 0x30 kernel data (spare)
    dq 0x00CF12000000FFFF         ; 0x38 not-present data segment
gdt_end:
gdt_desc:
    dw gdt_end - gdt - 1
    dd gdt
idt_desc:
    dw 256 * 8 - 1
    dd idt
resume: dd 0
syscalls: dd 0
align 4
tss: times 104 db 0
align 4096, db 0
ropage: dd 0x0badf00d
align 4096, db 0
kpage: dd 0x5ec0e7
align 4096, db 0
alias: times 1024 dd 0
alias2: dd 0x2a2a2a2a
        times 1023 dd 0
align 4096, db 0
idt: times 256 dq 0
end_of_image:
end_of_bss:
