; A stand-in bzImage for the Linux boot protocol (2.15 header, 64-bit capable): the
; protected-mode part reports on COM1 what the loader put in boot_params (from ESI/RSI),
; then ends through isa-debug-exit with 0x21 (exit status 0x43). The 32-bit entry is at
; the start of the protected-mode code, the 64-bit entry 0x200 further.
; Build: nasm -f bin linux_probe.asm
%include "probe_io.inc"

LOAD_ADDR equ 0x100000

; REPORT n: EBP = boot_params; prints the fields a loader fills in
%macro REPORT 1
        mov esi, s_hdrs
        call puts%1
        mov eax, [ebp + 0x202]
        call puthex%1
        mov esi, s_loader
        call puts%1
        movzx eax, byte [ebp + 0x210]
        call puthex%1
        mov esi, s_cmdline
        call puts%1
        mov esi, [ebp + 0x228]
        call puts%1
        mov esi, s_nl
        call puts%1
        mov esi, s_size
        call puts%1
        mov eax, [ebp + 0x21c]
        call puthex%1
        mov esi, s_initrd
        call puts%1
        mov esi, [ebp + 0x218]
        mov ecx, [ebp + 0x21c]
        call putn%1
        mov esi, s_nl
        call puts%1
        mov esi, s_e820
        call puts%1
        movzx eax, byte [ebp + 0x1e8]
        call puthex%1
        ret
%endmacro
SETUP_SECTS equ 1

        section setup start=0 vstart=0
        times 0x1f1 db 0
        db SETUP_SECTS                  ; 0x1f1 setup_sects
        dw 0                            ; 0x1f2 root_flags
        dd (pm_end - pm_start) / 16     ; 0x1f4 syssize
        dw 0                            ; 0x1f8 ram_size
        dw 0xffff                       ; 0x1fa vid_mode
        dw 0                            ; 0x1fc root_dev
        dw 0xaa55                       ; 0x1fe boot_flag
        db 0xeb, hdr_end - 0x202        ; 0x200 jump: its offset ends the header
        db "HdrS"                       ; 0x202
        dw 0x020f                       ; 0x206 version 2.15
        dd 0                            ; 0x208 realmode_swtch
        dw 0                            ; 0x20c start_sys_seg
        dw 0                            ; 0x20e kernel_version
        db 0                            ; 0x210 type_of_loader
        db 0x01                         ; 0x211 loadflags: LOADED_HIGH
        dw 0                            ; 0x212 setup_move_size
        dd LOAD_ADDR                    ; 0x214 code32_start
        dd 0, 0                         ; 0x218 ramdisk_image, ramdisk_size
        dd 0                            ; 0x220 bootsect_kludge
        dw 0                            ; 0x224 heap_end_ptr
        db 0, 0                         ; 0x226 ext_loader_ver, ext_loader_type
        dd 0                            ; 0x228 cmd_line_ptr
        dd 0x7fffffff                   ; 0x22c initrd_addr_max
        dd 0x200000                     ; 0x230 kernel_alignment
        db 0                            ; 0x234 relocatable_kernel
        db 0                            ; 0x235 min_alignment
        dw 0x0001                       ; 0x236 xloadflags: XLF_KERNEL_64
        dd 255                          ; 0x238 cmdline_size
        dd 0                            ; 0x23c hardware_subarch
        dq 0                            ; 0x240 hardware_subarch_data
        dd 0, 0                         ; 0x248 payload_offset, payload_length
        dq 0                            ; 0x250 setup_data
        dq LOAD_ADDR                    ; 0x258 pref_address
        dd 0x20000                      ; 0x260 init_size
        dd 0                            ; 0x264 handover_offset
hdr_end:
        times (SETUP_SECTS + 1) * 512 - ($ - $$) db 0

        section pm start=0x400 vstart=LOAD_ADDR   ; (SETUP_SECTS + 1) * 512
pm_start:
        bits 32
entry32:
        jmp body32
        times 0x200 - ($ - pm_start) db 0
        bits 64
entry64:
        mov rsp, stack_top
        mov ebp, esi
        mov esi, s_entry64
        call puts64
        mov esi, ebp
        call report64
        mov al, 0x21
        out 0xf4, al
        hlt
report64:
        REPORT 64
        PROBE_IO 64

        bits 32
body32:
        mov esp, stack_top
        mov ebp, esi
        mov esi, s_entry32
        call puts32
        call report32
        mov al, 0x21
        out 0xf4, al
        hlt
report32:
        REPORT 32
        PROBE_IO 32

s_entry32 db "linux32 ok", 10, 0
s_entry64 db "linux64 ok", 10, 0
s_hdrs    db "hdrs=", 0
s_loader  db "loader=", 0
s_cmdline db "cmdline=", 0
s_initrd  db "initrd=", 0
s_size    db "initrd_size=", 0
s_e820    db "e820=", 0
s_nl      db 10, 0
        align 16
        times 0x1000 db 0
stack_top:
        align 16
pm_end:
