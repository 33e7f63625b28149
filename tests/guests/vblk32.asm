; A minimal virtio-blk driver (virtio-mmio v2, split virtqueue, polled) in flat 32-bit
; protected mode. The device sits at VBLK (0xd0001000 by default).
;
; Default: read sectors 0-7, write their bitwise NOT to sectors 64-71, flush, read those
; back and compare; exit (0x21 << 1) | 1 on success, 0x7N on failure at step N.
; With -DBENCH_MIB=N: write N MiB from a pattern buffer in 256 KiB requests, flush, read
; the N MiB back; exit 0x22.
bits 32
org 0x100000
%include "com1.inc"

%ifndef VBLK
%define VBLK 0xd0001000
%endif
%define DESC    0x200000
%define AVAIL   0x201000
%define USED    0x202000
%define HDR     0x203000
%define STATUS  0x203100
%define BUF     0x400000
%define BUF2    0x500000
%define QSZ     8
%define CHUNK   (256 * 1024)

%define T_IN    0
%define T_OUT   1
%define T_FLUSH 4

%macro FAIL 1
    mov al, %1
    jmp fail
%endmacro

start:
    cmp dword [VBLK + 0x000], 0x74726976   ; "virt"
    jne near fail_magic
    cmp dword [VBLK + 0x004], 2            ; register layout version 2
    jne near fail_magic
    cmp dword [VBLK + 0x008], 2            ; block device
    jne near fail_magic
    mov dword [VBLK + 0x070], 0            ; reset
    mov dword [VBLK + 0x070], 1            ; ACKNOWLEDGE
    mov dword [VBLK + 0x070], 3            ; DRIVER
    mov dword [VBLK + 0x014], 1            ; device features 63:32
    test dword [VBLK + 0x010], 1           ; VIRTIO_F_VERSION_1
    jz near fail_features
    mov dword [VBLK + 0x024], 0
    mov dword [VBLK + 0x020], 0            ; no optional features
    mov dword [VBLK + 0x024], 1
    mov dword [VBLK + 0x020], 1            ; VERSION_1
    mov dword [VBLK + 0x070], 0x0b         ; FEATURES_OK
    test dword [VBLK + 0x070], 8
    jz near fail_features
    mov dword [VBLK + 0x030], 0            ; queue 0
    cmp dword [VBLK + 0x034], QSZ
    jb near fail_features
    mov dword [VBLK + 0x038], QSZ
    mov dword [VBLK + 0x080], DESC
    mov dword [VBLK + 0x084], 0
    mov dword [VBLK + 0x090], AVAIL
    mov dword [VBLK + 0x094], 0
    mov dword [VBLK + 0x0a0], USED
    mov dword [VBLK + 0x0a4], 0
    mov dword [VBLK + 0x044], 1            ; queue ready
    mov dword [VBLK + 0x070], 0x0f         ; DRIVER_OK

%ifdef BENCH_MIB
    ; A recognisable pattern in the buffer: dword i = i * 2654435761.
    mov edi, BUF
    xor ecx, ecx
.fill:
    mov eax, ecx
    imul eax, eax, 2654435761
    mov [edi + ecx * 4], eax
    inc ecx
    cmp ecx, CHUNK / 4
    jb .fill
    xor ebx, ebx                           ; sector
.wloop:
    mov eax, T_OUT
    mov ecx, BUF
    mov edx, CHUNK
    call blk_req
    jnz near fail_io
    add ebx, CHUNK / 512
    cmp ebx, BENCH_MIB * 2048
    jb .wloop
    mov eax, T_FLUSH
    xor edx, edx
    call blk_req
    jnz near fail_io
    xor ebx, ebx
.rloop:
    mov eax, T_IN
    mov ecx, BUF2
    mov edx, CHUNK
    call blk_req
    jnz near fail_io
    add ebx, CHUNK / 512
    cmp ebx, BENCH_MIB * 2048
    jb .rloop
    mov esi, BUF
    mov edi, BUF2
    mov ecx, CHUNK / 4
    repe cmpsd
    jne near fail_compare
    mov esi, msg_bench
    call puts
    EXIT_WITH 0x22
%else
    mov eax, T_IN                          ; read sectors 0-7
    xor ebx, ebx
    mov ecx, BUF
    mov edx, 4096
    call blk_req
    jnz near fail_io
    mov esi, BUF                           ; BUF2 = NOT BUF
    mov edi, BUF2
    mov ecx, 1024
.invert:
    lodsd
    not eax
    stosd
    loop .invert
    mov eax, T_OUT                         ; write sectors 64-71
    mov ebx, 64
    mov ecx, BUF2
    mov edx, 4096
    call blk_req
    jnz near fail_io
    mov eax, T_FLUSH
    xor edx, edx
    call blk_req
    jnz near fail_io
    mov eax, T_IN                          ; read them back into BUF
    mov ebx, 64
    mov ecx, BUF
    mov edx, 4096
    call blk_req
    jnz near fail_io
    mov esi, BUF
    mov edi, BUF2
    mov ecx, 1024
    repe cmpsd
    jne near fail_compare
    mov esi, msg_ok
    call puts
    EXIT_WITH 0x21
%endif

; blk_req: eax = type, ebx = sector, ecx = buffer, edx = length (0: no data).
; Returns ZF set when the device answered VIRTIO_BLK_S_OK. Keeps ebx.
blk_req:
    mov [HDR], eax
    mov dword [HDR + 4], 0
    mov [HDR + 8], ebx
    mov dword [HDR + 12], 0
    mov byte [STATUS], 0xff
    ; desc 0: the header, device-readable
    mov dword [DESC + 0], HDR
    mov dword [DESC + 4], 0
    mov dword [DESC + 8], 16
    mov word [DESC + 12], 1                ; NEXT
    mov word [DESC + 14], 1
    test edx, edx
    jnz .data
    mov word [DESC + 14], 2                ; no data: straight to the status
    jmp .status
.data:
    mov dword [DESC + 16], ecx
    mov dword [DESC + 20], 0
    mov dword [DESC + 24], edx
    mov word [DESC + 28], 1                ; NEXT
    cmp eax, T_IN
    jne .ro
    mov word [DESC + 28], 3                ; NEXT | WRITE: the device fills it
.ro:
    mov word [DESC + 30], 2
.status:
    mov dword [DESC + 32], STATUS
    mov dword [DESC + 36], 0
    mov dword [DESC + 40], 1
    mov word [DESC + 44], 2                ; WRITE
    mov word [DESC + 46], 0
    movzx eax, word [AVAIL + 2]            ; avail->ring[idx % QSZ] = head 0
    mov esi, eax
    and esi, QSZ - 1
    mov word [AVAIL + 4 + esi * 2], 0
    inc ax
    mov [AVAIL + 2], ax                    ; publish
    mov dword [VBLK + 0x050], 0            ; notify queue 0
.wait:
    cmp [USED + 2], ax
    jne .wait
    mov eax, [VBLK + 0x060]                ; what an interrupt handler does: read, ack
    mov [VBLK + 0x064], eax
    cmp byte [STATUS], 0
    ret

fail_magic:
    FAIL 0x71
fail_features:
    FAIL 0x72
fail_io:
    FAIL 0x73
fail_compare:
    FAIL 0x74
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

msg_ok: db "vblk: read, wrote, flushed, read back", 10, 0
msg_bench: db "vblk: bench done", 10, 0
msg_fail: db "vblk: failed", 10, 0
