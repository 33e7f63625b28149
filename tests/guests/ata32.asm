; A minimal ATA PIO driver (primary channel, master, polled, nIEN set) in flat 32-bit
; protected mode, doing what libata's PIO path does: IDENTIFY, SET MULTIPLE MODE, then
; READ/WRITE MULTIPLE EXT moving each sector with one `rep insw` / `rep outsw`.
;
; Default: read sectors 0-7, write their bitwise NOT to sectors 64-71, FLUSH CACHE EXT,
; read them back and compare; exit (0x21 << 1) | 1, or 0x7N on failure at step N.
; With -DBENCH_MIB=N: write N MiB in 512-sector commands, flush, read them back; exit 0x22.
bits 32
org 0x100000
%include "com1.inc"

%define DATA    0x1f0
%define NSECT   0x1f2
%define LBAL    0x1f3
%define LBAM    0x1f4
%define LBAH    0x1f5
%define DEVICE  0x1f6
%define CMDSTAT 0x1f7
%define CTL     0x3f6
%define IDBUF   0x203000
%define BUF     0x400000
%define BUF2    0x500000
%define MULTI   16
%define CHUNK_SECTORS 512

%macro OUTB 2
    mov dx, %1
    mov al, %2
    out dx, al
%endmacro

start:
    OUTB CTL, 0x02                         ; nIEN: we poll
    OUTB DEVICE, 0xa0                      ; master
    OUTB CMDSTAT, 0xec                     ; IDENTIFY DEVICE
    call wait_drq
    jc near fail_identify
    mov edi, IDBUF
    mov ecx, 256
    mov dx, DATA
    rep insw
    cmp word [IDBUF], 0x0040               ; a fixed ATA disk
    jne near fail_identify
    test word [IDBUF + 83 * 2], 0x0400     ; LBA48
    jz near fail_identify
    OUTB NSECT, MULTI
    OUTB CMDSTAT, 0xc6                     ; SET MULTIPLE MODE
    call wait_ready
    jc near fail_identify

%ifdef BENCH_MIB
    mov edi, BUF
    xor ecx, ecx
.fill:
    mov eax, ecx
    imul eax, eax, 2654435761
    mov [edi + ecx * 4], eax
    inc ecx
    cmp ecx, CHUNK_SECTORS * 128
    jb .fill
    xor ebx, ebx
.wloop:
    mov esi, BUF
    mov ecx, CHUNK_SECTORS
    call write48
    jc near fail_io
    add ebx, CHUNK_SECTORS
    cmp ebx, BENCH_MIB * 2048
    jb .wloop
    OUTB CMDSTAT, 0xea                     ; FLUSH CACHE EXT
    call wait_ready
    jc near fail_io
    xor ebx, ebx
.rloop:
    mov edi, BUF2
    mov ecx, CHUNK_SECTORS
    call read48
    jc near fail_io
    add ebx, CHUNK_SECTORS
    cmp ebx, BENCH_MIB * 2048
    jb .rloop
    mov esi, BUF
    mov edi, BUF2
    mov ecx, CHUNK_SECTORS * 128
    repe cmpsd
    jne near fail_compare
    mov esi, msg_bench
    call puts
    EXIT_WITH 0x22
%else
    xor ebx, ebx
    mov edi, BUF
    mov ecx, 8
    call read48
    jc near fail_io
    mov esi, BUF
    mov edi, BUF2
    mov ecx, 1024
.invert:
    lodsd
    not eax
    stosd
    loop .invert
    mov ebx, 64
    mov esi, BUF2
    mov ecx, 8
    call write48
    jc near fail_io
    OUTB CMDSTAT, 0xea
    call wait_ready
    jc near fail_io
    mov ebx, 64
    mov edi, BUF
    mov ecx, 8
    call read48
    jc near fail_io
    mov esi, BUF
    mov edi, BUF2
    mov ecx, 1024
    repe cmpsd
    jne near fail_compare
    mov esi, msg_ok
    call puts
    EXIT_WITH 0x21
%endif

; taskfile48: ebx = LBA (below 2^32), ecx = sector count (1..65535). Keeps ebx, ecx.
taskfile48:
    mov dx, NSECT
    mov al, ch
    out dx, al                             ; count 15:8
    mov dx, LBAL
    mov eax, ebx
    shr eax, 24
    out dx, al                             ; LBA 31:24
    mov dx, LBAM
    xor al, al
    out dx, al                             ; LBA 39:32
    mov dx, LBAH
    out dx, al                             ; LBA 47:40
    mov dx, NSECT
    mov al, cl
    out dx, al                             ; count 7:0
    mov dx, LBAL
    mov al, bl
    out dx, al
    mov dx, LBAM
    mov al, bh
    out dx, al
    mov dx, LBAH
    mov eax, ebx
    shr eax, 16
    out dx, al
    OUTB DEVICE, 0x40                      ; LBA mode, master
    ret

; read48: ebx = LBA, ecx = count, edi = buffer. CF set on error. Keeps ebx.
read48:
    call taskfile48
    mov ebp, ecx                           ; sectors left
    OUTB CMDSTAT, 0x29                     ; READ MULTIPLE EXT
.block:
    call wait_drq
    jc .out
    mov esi, MULTI
.sector:
    mov ecx, 256
    mov dx, DATA
    rep insw                               ; one sector, as ata_sff_data_xfer does
    dec ebp
    jz .done
    dec esi
    jnz .sector
    jmp .block
.done:
    clc
.out:
    ret

; write48: ebx = LBA, ecx = count, esi = buffer. CF set on error. Keeps ebx.
write48:
    call taskfile48
    mov ebp, ecx
    OUTB CMDSTAT, 0x39                     ; WRITE MULTIPLE EXT
.block:
    call wait_drq
    jc .out
    mov edi, MULTI
.sector:
    mov ecx, 256
    mov dx, DATA
    rep outsw
    dec ebp
    jz .last
    dec edi
    jnz .sector
    jmp .block
.last:
    call wait_ready
.out:
    ret

; wait_drq: poll status until BSY clears; CF set on ERR or no DRQ.
wait_drq:
    mov dx, CMDSTAT
.poll:
    in al, dx
    test al, 0x80
    jnz .poll
    test al, 0x01
    jnz .bad
    test al, 0x08
    jz .bad
    clc
    ret
.bad:
    stc
    ret

; wait_ready: poll status until BSY clears; CF set on ERR or DRQ still up.
wait_ready:
    mov dx, CMDSTAT
.poll:
    in al, dx
    test al, 0x80
    jnz .poll
    test al, 0x09
    jnz .bad
    clc
    ret
.bad:
    stc
    ret

fail_identify:
    mov al, 0x71
    jmp fail
fail_io:
    mov al, 0x73
    jmp fail
fail_compare:
    mov al, 0x74
fail:
    mov esi, msg_fail
    push eax
    call puts
    pop eax
    out DEBUG_EXIT, al
.stuck:
    hlt
    jmp .stuck

DEFINE_PUTC
DEFINE_PUTS

msg_ok: db "ata: read, wrote, flushed, read back", 10, 0
msg_bench: db "ata: bench done", 10, 0
msg_fail: db "ata: failed", 10, 0
