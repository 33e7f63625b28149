; String instructions: REP MOVS/STOS/LODS in byte, word and dword sizes, forward and
; backward (DF), overlapping copies, REPE/REPNE CMPS and SCAS stopping on the match or
; the count (ECX, ESI, EDI and the arithmetic flags where they stop), REP with ECX = 0,
; 16-bit addressing (0x67: SI/DI/CX wrap at 64 KiB), a segment override on the source,
; REP OUTSB to COM1 and REP INSB from the CMOS data port.
%define EXIT_CODE 0x48
%include "lib.inc"

%define BUF     0x300000
%define BUF2    0x310000
%define FLAGS   0x8d5               ; OF SF ZF AF PF CF

; SUM addr, len: print a checksum (rotating add of dwords) of len bytes at addr
%macro SUM 3
    push esi
    push ecx
    mov esi, %2
    mov ecx, %3
    call checksum
    pop ecx
    pop esi
    SHOW %1, eax
%endmacro

; REGS: ECX, ESI and EDI (as offsets from BUF/BUF2 where they point there), masked flags
%macro REGS 0
    pushfd
    SHOW "ecx", ecx
    mov eax, esi
    SHOW "esi", eax
    SHOW "edi", edi
    mov eax, [esp]
    and eax, FLAGS
    SHOW "fl", eax
    popfd
    call nl
%endmacro

main:
    ; pattern: byte i = i * 7 + 3
    mov edi, BUF
    xor ecx, ecx
.pat:
    lea eax, [ecx * 8]
    sub eax, ecx
    add eax, 3
    mov [edi + ecx], al
    inc ecx
    cmp ecx, 0x800
    jne .pat

    PRINT `movs\n`
    cld
    mov esi, BUF
    mov edi, BUF2
    mov ecx, 1000
    rep movsb
    REGS
    mov esi, BUF + 1
    mov edi, BUF2 + 0x1001
    mov ecx, 333
    rep movsw
    REGS
    mov esi, BUF + 3
    mov edi, BUF2 + 0x2003
    mov ecx, 250
    rep movsd
    REGS
    std
    mov esi, BUF + 999
    mov edi, BUF2 + 0x3000 + 999
    mov ecx, 1000
    rep movsb
    REGS
    mov esi, BUF + 996
    mov edi, BUF2 + 0x4000 + 996
    mov ecx, 250
    rep movsd
    REGS
    cld
    SUM "sum", BUF2, 0x5000
    call nl
    ; overlapping: forward copy by one (smears), backward copy by one (shifts)
    mov esi, BUF2
    lea edi, [esi + 1]
    mov ecx, 64
    rep movsb
    std
    mov esi, BUF2 + 0x1000 + 63
    lea edi, [esi + 1]
    mov ecx, 64
    rep movsb
    cld
    SUM "overlap", BUF2, 0x1100
    call nl

    PRINT `stos lods\n`
    mov edi, BUF2
    mov eax, 0x11223344
    mov ecx, 7
    rep stosd
    mov ecx, 5
    rep stosw
    mov ecx, 3
    rep stosb
    REGS
    std
    mov edi, BUF2 + 0x100
    mov ecx, 4
    rep stosw
    cld
    SUM "sum", BUF2, 0x110
    mov esi, BUF + 10
    mov ecx, 5
    rep lodsb                       ; AL = the last byte loaded
    movzx eax, al
    SHOW "al", eax
    std
    lodsd
    SHOW "eax", eax
    cld
    call nl

    PRINT `cmps scas\n`
    mov esi, BUF
    mov edi, BUF2
    mov ecx, 0x800
    rep movsb
    mov byte [BUF2 + 0x123], 0
    mov esi, BUF
    mov edi, BUF2
    mov ecx, 0x800
    repe cmpsb                      ; stops after the difference
    REGS
    mov esi, BUF
    mov edi, BUF2
    mov ecx, 0x40
    repe cmpsd                      ; count runs out, all equal
    REGS
    mov esi, BUF
    mov edi, BUF2 + 1
    mov ecx, 0x100
    repne cmpsb                     ; stops on the first equal pair (if any)
    REGS
    mov edi, BUF
    mov al, [BUF + 0x77]
    mov ecx, 0x1000
    repne scasb                     ; finds the first byte equal to AL
    REGS
    mov edi, BUF2
    mov eax, [BUF2]
    mov ecx, 0x10
    repe scasd
    REGS
    std
    mov edi, BUF + 0x200
    mov ax, [BUF + 0x100]
    mov ecx, 0x100
    repne scasw
    REGS
    cld
    ; ECX = 0: nothing runs, flags untouched
    mov eax, 1
    add eax, -1                     ; ZF CF PF AF set
    xor ecx, ecx
    mov esi, BUF
    mov edi, BUF2
    repe cmpsb
    REGS

    PRINT `a16 and segments\n`
    mov ax, SEL_KDATA
    mov es, ax
    mov esi, 0x0000fff0             ; low 16 bits wrap at 64 KiB
    mov edi, 0x0001fff8
    mov ecx, 0xffff0010
    push edi
    push ecx
    xor edi, edi                    ; low memory holds the firmware's data: set it
    mov ecx, 0x10
    mov eax, 0x5a5a5a5a
    rep stosd
    pop ecx
    pop edi
    mov dword [0xfff0], 0x01020304
    mov dword [0xfff4], 0x05060708
    mov dword [0xfff8], 0
    mov dword [0xfffc], 0
    a16 rep movsw                   ; 0x10 words from DS:SI to ES:DI (16-bit)
    REGS
    SUM "low", 0, 0x40
    SUM "top", 0xfff0, 0x10
    call nl
    mov eax, BUF
    mov ecx, 4
    mov esi, BUF + 0x20
    mov edi, BUF2 + 0x800
    rep movsb                       ; plain: DS source
    mov esi, BUF + 0x20
    mov ecx, 4
    rep fs movsb                    ; FS override on the source (same base here)
    SUM "ovr", BUF2 + 0x800, 8
    call nl

    PRINT `ins outs\n`
    mov esi, outs_msg
    mov ecx, outs_len
    mov dx, COM1
    rep outsb
    mov al, 0x0d                    ; CMOS register D: 0x80
    out 0x70, al
    mov edi, BUF2
    mov ecx, 4
    mov dx, 0x71
    rep insb
    SHOW "insb", [BUF2]
    SHOW "edi", edi
    call nl
    ret

checksum:                           ; ESI, ECX (a multiple of 4) -> EAX
    xor eax, eax
    shr ecx, 2
.c: rol eax, 5
    add eax, [esi]
    add esi, 4
    loop .c
    ret

outs_msg: db "string out", 10
outs_len equ $ - outs_msg
END_IMAGE
