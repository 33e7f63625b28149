; Two (or more) vCPUs start here together (flat 32-bit, 1 MiB). Each finds its APIC id
; with CPUID leaf 1 (EBX[31:24]), prints "cpu N reporting" under a spinlock, and counts
; itself in. vCPU 0 waits until every vCPU (CPUID.1:EBX[23:16]) has reported, then
; exits with (0x24 << 1) | 1; the others halt.
bits 32
org 0x100000
%include "com1.inc"

start:
    mov eax, 1
    cpuid
    mov edi, ebx
    shr edi, 24                     ; this vCPU's APIC id
    shr ebx, 16
    and ebx, 0xff                   ; logical processors in the package
    mov [ncpus], ebx
    ; each vCPU its own stack: 0x80000 - id * 0x1000
    mov esp, edi
    shl esp, 12
    neg esp
    add esp, 0x80000
.lock:
    mov eax, 1
    xchg eax, [spinlock]
    test eax, eax
    jz .locked
    pause
    jmp .lock
.locked:
    mov esi, msg
    call puts
    mov eax, edi
    add al, '0'
    call putc
    mov esi, msg2
    call puts
    mov dword [spinlock], 0
    lock inc dword [reported]
    test edi, edi
    jnz .park
.wait:
    mov eax, [reported]
    cmp eax, [ncpus]
    jb .wait
    EXIT_WITH 0x24
.park:
    cli
    hlt
    jmp .park

DEFINE_PUTC
DEFINE_PUTS

msg: db "cpu ", 0
msg2: db " reporting", 10, 0
align 4
spinlock: dd 0
reported: dd 0
ncpus: dd 0
