; Straight-line integer work, printed: arithmetic and flags (only defined ones), MUL/
; IMUL/DIV/IDIV, shifts and rotates, SHLD/SHRD, BT/BTS/BTR/BTC, BSF/BSR, BSWAP, XADD,
; CMPXCHG, CMOVcc/SETcc, MOVZX/MOVSX, ENTER/LEAVE, a sieve of primes and a
; bitwise CRC-32. (No BCD adjusts: kvm_pvm cannot run DAA; tcg_guests/bcd.asm has them.)
%define EXIT_CODE 0x53
%define NO_IRET
%include "lib.inc"

%define ARITH 0x8d5                 ; OF SF ZF AF PF CF

%macro FL 1                         ; print "name=flags" masked by %1
    pushfd
    pop eax
    and eax, %1
    call hex8
    call sp_
%endmacro

main:
    PRINT "add/sub: "
    mov eax, 0x7fffffff
    add eax, 1
    FL ARITH
    mov eax, 0
    sub eax, 1
    FL ARITH
    mov al, 0x0f
    add al, 0x01
    FL ARITH
    mov eax, 0x80000000
    neg eax
    FL ARITH
    stc
    mov eax, 5
    adc eax, 7
    mov ebx, eax
    stc
    sbb ebx, 20
    FL ARITH
    SHOW "ebx", ebx
    call nl

    PRINT "mul/div: "
    mov eax, 0x12345678
    mov ecx, 0x9abcdef1
    mul ecx
    SHOW "edx", edx
    SHOW "eax", eax
    FL 0x801                        ; CF OF only
    mov eax, -7
    mov ecx, 3
    imul ecx
    SHOW "eax", eax
    mov eax, -100
    cdq
    mov ecx, 7
    idiv ecx
    SHOW "q", eax
    SHOW "r", edx
    imul eax, ecx, -3
    SHOW "imul3", eax
    call nl

    PRINT "shifts: "
    mov eax, 0x81234567
    shl eax, 4
    FL 0x0c5                        ; SF ZF PF CF (count > 1: OF, AF undefined)
    SHOW "shl", eax
    sar eax, 7
    SHOW "sar", eax
    ror eax, 13
    SHOW "ror", eax
    stc
    rcl eax, 1
    FL 0x801
    SHOW "rcl", eax
    mov edx, 0xdeadbeef
    shld eax, edx, 12
    SHOW "shld", eax
    shrd eax, edx, 20
    SHOW "shrd", eax
    call nl

    PRINT "bits: "
    mov eax, 0x00f00100
    bsf ecx, eax
    bsr edx, eax
    SHOW "bsf", ecx
    SHOW "bsr", edx
    bts eax, 3
    FL 1
    btr eax, 8
    FL 1
    btc eax, 31
    SHOW "bt*", eax
    mov dword [scratch], 0
    mov ecx, 37
    bts [scratch], ecx              ; memory bit string: bit 37 = dword 1 bit 5
    SHOW "btmem", [scratch + 4]
    bswap eax
    SHOW "bswap", eax
    call nl

    PRINT "atomics: "
    mov dword [scratch], 10
    mov eax, 5
    lock xadd [scratch], eax
    SHOW "xadd", eax
    SHOW "mem", [scratch]
    mov eax, 15
    mov ecx, 99
    lock cmpxchg [scratch], ecx
    FL 0x40
    SHOW "mem", [scratch]
    cmpxchg [scratch], ecx
    SHOW "eax", eax
    call nl

    PRINT "cmov/set/ext: "
    mov eax, 1
    mov ecx, 2
    cmp eax, ecx
    cmovl eax, ecx
    setg bl
    setb bh
    movzx ebx, bx
    SHOW "cmov", eax
    SHOW "set", ebx
    mov al, 0x80
    movsx ecx, al
    movzx edx, al
    SHOW "sx", ecx
    SHOW "zx", edx
    mov ax, 0x8001
    cwde
    SHOW "cwde", eax
    call nl

    PRINT "frame: "
    mov ebp, 0x5555
    mov ebx, esp
    enter 16, 0
    mov ecx, ebx
    sub ecx, esp
    SHOW "depth", ecx
    leave
    sub ebx, esp
    SHOW "after", ebx
    SHOW "ebp", ebp
    call nl

    ; sieve of Eratosthenes below 5000
    mov edi, 0x300000
    mov ecx, 5000
    mov al, 1
    rep stosb
    mov ebx, 2
.outer:
    mov eax, ebx
    imul eax, ebx
    cmp eax, 5000
    jae .count
    cmp byte [0x300000 + ebx], 0
    je .next
.inner:
    mov byte [0x300000 + eax], 0
    add eax, ebx
    cmp eax, 5000
    jb .inner
.next:
    inc ebx
    jmp .outer
.count:
    xor eax, eax
    mov ecx, 2
.cnt:
    movzx edx, byte [0x300000 + ecx]
    add eax, edx
    inc ecx
    cmp ecx, 5000
    jb .cnt
    mov [primes], eax
    SHOW "primes", eax
    ; CRC-32 (reflected, 0xedb88320) of this kernel's first 4 KiB
    mov esi, 0x100000
    mov ecx, 4096
    mov edx, 0xffffffff
.byte:
    lodsb
    xor dl, al
    mov ebx, 8
.bit:
    shr edx, 1
    jnc .nox
    xor edx, 0xedb88320
.nox:
    dec ebx
    jnz .bit
    loop .byte
    not edx
    SHOW "crc", edx
    call nl
    ret

align 4
scratch: dd 0, 0
primes: dd 0
END_IMAGE
