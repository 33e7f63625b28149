; Device DMA over translated code (flat 32-bit protected mode, polled virtio-blk at VBLK).
;
; virtio-blk reads sector 0 (a function returning 0x1111aaaa) into page FUNC; the guest
; calls it CALLS times, so an emulator translates and compiles it; then virtio-blk reads
; sector 1 (the same function returning 0x2222bbbb) over it, and the guest calls it once
; more. Exit (0x31 << 1) | 1 when the new code ran, 0x32 when the old one did (a stale
; translation), 0x7N on other failures.
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
%define FUNC    0x300000
%define QSZ     8
%define CALLS   500
%define OLD     0x1111aaaa
%define NEW     0x2222bbbb

%macro FAIL 1
    mov al, %1
    jmp fail
%endmacro

start:
    cmp dword [VBLK + 0x000], 0x74726976   ; "virt"
    jne near fail_magic
    cmp dword [VBLK + 0x008], 2            ; block device
    jne near fail_magic
    mov dword [VBLK + 0x070], 0            ; reset
    mov dword [VBLK + 0x070], 1            ; ACKNOWLEDGE
    mov dword [VBLK + 0x070], 3            ; DRIVER
    mov dword [VBLK + 0x024], 0
    mov dword [VBLK + 0x020], 0            ; no optional features
    mov dword [VBLK + 0x024], 1
    mov dword [VBLK + 0x020], 1            ; VERSION_1
    mov dword [VBLK + 0x070], 0x0b         ; FEATURES_OK
    test dword [VBLK + 0x070], 8
    jz near fail_features
    mov dword [VBLK + 0x030], 0            ; queue 0
    mov dword [VBLK + 0x038], QSZ
    mov dword [VBLK + 0x080], DESC
    mov dword [VBLK + 0x084], 0
    mov dword [VBLK + 0x090], AVAIL
    mov dword [VBLK + 0x094], 0
    mov dword [VBLK + 0x0a0], USED
    mov dword [VBLK + 0x0a4], 0
    mov dword [VBLK + 0x044], 1            ; queue ready
    mov dword [VBLK + 0x070], 0x0f         ; DRIVER_OK

    xor ebx, ebx                           ; sector 0: the old function
    call read_func
    jnz near fail_io
    mov ecx, CALLS
.hot:
    push ecx
    call FUNC
    pop ecx
    cmp eax, OLD
    jne near fail_first
    loop .hot

    mov ebx, 1                             ; sector 1: the new one, over the old
    call read_func
    jnz near fail_io
    call FUNC
    cmp eax, NEW
    je .new
    cmp eax, OLD
    jne near fail_other
    mov esi, msg_stale
    call puts
    EXIT_WITH 0x32
.new:
    mov esi, msg_new
    call puts
    EXIT_WITH 0x31

; read_func: read sector ebx into FUNC (512 bytes). ZF set when the device said OK.
read_func:
    mov dword [HDR], 0                     ; VIRTIO_BLK_T_IN
    mov dword [HDR + 4], 0
    mov [HDR + 8], ebx
    mov dword [HDR + 12], 0
    mov byte [STATUS], 0xff
    mov dword [DESC + 0], HDR              ; desc 0: header, device-readable
    mov dword [DESC + 4], 0
    mov dword [DESC + 8], 16
    mov word [DESC + 12], 1                ; NEXT
    mov word [DESC + 14], 1
    mov dword [DESC + 16], FUNC            ; desc 1: the code page, device-writable
    mov dword [DESC + 20], 0
    mov dword [DESC + 24], 512
    mov word [DESC + 28], 3                ; NEXT | WRITE
    mov word [DESC + 30], 2
    mov dword [DESC + 32], STATUS          ; desc 2: status byte
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
    mov eax, [VBLK + 0x060]                ; read and ack the interrupt status
    mov [VBLK + 0x064], eax
    cmp byte [STATUS], 0
    ret

fail_magic:
    FAIL 0x71
fail_features:
    FAIL 0x72
fail_io:
    FAIL 0x73
fail_first:
    FAIL 0x74
fail_other:
    FAIL 0x75
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

msg_new: db "dmacode: the new code ran", 10, 0
msg_stale: db "dmacode: the old code ran (stale translation)", 10, 0
msg_fail: db "dmacode: failed", 10, 0
