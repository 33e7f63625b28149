; Interrupt and trap gates (IF cleared or kept, TF cleared), single-step #DB, ring 3
; entered by IRET (IOPL, data segments nulled), INT from ring 3 through a DPL 3 gate with
; the TSS stack switch (ESP0/SS0 used, the user SS:ESP saved), a DPL 0 gate from ring 3,
; privileged instructions at CPL 3, POPF at CPL 3, #TS for a bad TSS.SS0 (handled in a
; conforming segment at CPL 3), a call gate with parameters copied to
; the inner stack and RETF imm back out, and a double fault from a not-present gate.
%define EXIT_CODE 0x44
%include "lib.inc"

%define SEL_CGATE   0x33            ; GDT 0x30: call gate DPL 3 -> SEL_KCODE:cg_target

main:
    ; call gate: 2 dword parameters
    mov eax, cg_target
    mov edx, eax
    and eax, 0xffff
    or eax, SEL_KCODE << 16
    mov [gdt + 0x30], eax
    and edx, 0xffff0000
    or edx, 0xec02
    mov [gdt + 0x34], edx
    ; #TS handler in a conforming code segment (GDT 0x38)
    mov dword [gdt + 0x38], 0x0000FFFF
    mov dword [gdt + 0x3c], 0x00CF9E00
    mov eax, ts_handler
    mov edx, eax
    and eax, 0xffff
    or eax, 0x38 << 16
    mov [idt + 10 * 8], eax
    and edx, 0xffff0000
    or edx, 0x8e00
    mov [idt + 10 * 8 + 4], edx
    ; gates for the probes
    mov ecx, 0x40                   ; interrupt gate, DPL 0
    mov eax, stubs + 0x40 * 16
    mov edx, 0x8e00
    call set_gate
    mov dword [hook + 0x40 * 4], probe
    mov ecx, 0x41                   ; trap gate, DPL 0
    mov eax, stubs + 0x41 * 16
    mov edx, 0x8f00
    call set_gate
    mov dword [hook + 0x41 * 4], probe
    mov ecx, 0x81                   ; trap gate, DPL 3: the ring-3 probe
    mov eax, stubs + 0x81 * 16
    mov edx, 0xef00
    call set_gate
    mov dword [hook + 0x81 * 4], probe

    PRINT `gates\n`
    sti
    int 0x40
    call show_probe
    int 0x41
    call show_probe
    cli
    int 0x41
    call show_probe

    PRINT `single step\n`
    mov dword [hook + 1 * 4], db_hook
    pushfd
    or dword [esp], 0x100
    popfd
    mov eax, 1                      ; runs, then #DB with EIP after it
    mov eax, 2
    SHOW "db.eip", [db_eip]
    mov eax, [db_dr6]
    and eax, 0x4000
    SHOW "dr6.bs", eax
    SHOW "fl", [db_fl]
    call nl
    ; MOV SS holds the single-step trap back for one instruction: 4 traps, recorded
    mov dword [hook + 1 * 4], db_steps
    pushfd
    or dword [esp], 0x100
    popfd
    mov ax, ss
    mov ss, ax
    mov eax, 3
    mov eax, 4
    nop
    nop
    mov esi, steps
    mov ecx, 4
.steps:
    lodsd
    sub eax, 0x100000
    SHOW "step", eax
    loop .steps
    call nl

    PRINT `ring 3\n`
    mov ax, SEL_KDATA
    mov fs, ax                      ; DPL 0 data: IRET to ring 3 nulls it
    mov ax, SEL_UDATA
    mov gs, ax                      ; DPL 3 data: kept
    mov eax, user
    mov edx, 0x3002                 ; IOPL 3 for the first part
    call enter_user
    PRINT `back in ring 0\n`
    SHOW "fs", [u_fs]
    SHOW "gs", [u_gs]
    SHOW "cs", [u_cs]
    SHOW "fl", [u_fl]
    call nl
    mov esi, cg_rec
    mov ecx, 7
.cg:
    SHOW "cg", [esi]
    add esi, 4
    loop .cg
    call nl
    SHOW "esp after retf", [u_esp_after]
    SHOW "popf", [u_popf]
    call nl
    PRINT `ring 3, IOPL 0\n`
    mov eax, user2
    mov edx, 0x002
    call enter_user
    SHOW "popf", [u_popf]
    call nl

    PRINT `double fault\n`
    mov ecx, 0                      ; #DE's gate not present: #NP while delivering #DE
    mov eax, stubs
    mov edx, 0x0e00
    call set_gate
    mov dword [hook + 8 * 4], df_hook
    mov [df_esp], esp
    xor ecx, ecx
    div ecx
.after_df:
    SHOW "df.err", [df_err]
    call nl
    ret

; probe hook: record the EFLAGS inside the handler and the frame, return
probe:
    push eax
    pushfd
    pop eax
    and eax, 0x3300                 ; IF TF IOPL
    mov [p_inside], eax
    mov eax, [esp + 4]
    mov [p_vec], eax
    mov eax, [esp + 20]
    and eax, 0x3300
    mov [p_saved], eax
    mov eax, [esp + 16]
    mov [p_cs], eax
    mov [p_esp], esp
    pop eax
    add esp, 8
    iret

show_probe:
    SHOW "vec", [p_vec]
    SHOW "inside", [p_inside]
    SHOW "saved", [p_saved]
    call nl
    ret

db_hook:
    mov eax, [esp + 8]
    mov [db_eip], eax
    mov eax, dr6
    mov [db_dr6], eax
    mov eax, [esp + 16]
    and eax, 0x3300
    mov [db_fl], eax
    and dword [esp + 16], ~0x100    ; TF off for the return
    add esp, 8
    iret

db_steps:                           ; record EIP, keep TF for four traps
    push eax
    push ebx
    mov ebx, [nsteps]
    mov eax, [esp + 16]
    mov [steps + ebx * 4], eax
    inc ebx
    mov [nsteps], ebx
    cmp ebx, 4
    jb .more
    and dword [esp + 24], ~0x100
.more:
    pop ebx
    pop eax
    add esp, 8
    iret

df_hook:
    mov eax, [esp + 4]
    mov [df_err], eax
    mov esp, [df_esp]
    mov ecx, 0                      ; restore #DE's gate
    mov eax, stubs
    mov edx, 0x8e00
    call set_gate
    jmp main.after_df

; #TS through a conforming segment: no stack switch, runs at the interrupted CPL
ts_handler:
    pop dword [ts_err]
    mov eax, [esp]
    sub eax, 0x100000
    mov [ts_eip], eax
    mov eax, [esp + 4]
    mov [ts_cs], eax
    mov dword [tss + 8], SEL_KDATA
    add dword [esp], 2              ; skip the INT
    iret

; ring 0 end of the call gate
cg_target:
    mov [cg_rec + 24], esp
    push eax
    mov eax, [esp + 4]
    mov [cg_rec + 0], eax           ; return EIP
    mov eax, [esp + 8]
    mov [cg_rec + 4], eax           ; return CS
    mov eax, [esp + 12]
    mov [cg_rec + 8], eax           ; parameter pushed last
    mov eax, [esp + 16]
    mov [cg_rec + 12], eax          ; parameter pushed first
    mov eax, [esp + 20]
    mov [cg_rec + 16], eax          ; user ESP
    mov eax, [esp + 24]
    mov [cg_rec + 20], eax          ; user SS
    pop eax
    retf 8

user:
    mov eax, fs
    mov [u_fs], eax
    mov eax, gs
    mov [u_gs], eax
    mov eax, cs
    mov [u_cs], eax
    pushfd
    pop eax
    and eax, 0x3300
    mov [u_fl], eax
    PRINT `in ring 3\n`             ; IOPL 3: port I/O allowed
    int 0x81
    SHOW "vec", [p_vec]
    SHOW "saved", [p_saved]
    SHOW "cs", [p_cs]
    mov eax, KSTACK0
    sub eax, [p_esp]
    SHOW "depth", eax               ; the probe ran on the TSS stack
    mov eax, [KSTACK0 - 8]
    SHOW "user esp", eax
    mov eax, [KSTACK0 - 4]
    SHOW "user ss", eax
    call nl
    ; #TS: TSS.SS0 names a DPL 3 segment, so INT to ring 0 cannot switch stacks. The #TS
    ; gate leads to a conforming segment: its handler runs at CPL 3 on this stack.
    mov dword [tss + 8], SEL_UDATA
    int 0x81                        ; #TS(0x20), EIP at the INT; the handler skips it
    SHOW "ts err", [ts_err]
    SHOW "ts cs", [ts_cs]
    SHOW "ts eip", [ts_eip]
    call nl
    ; the call gate
    push dword 0x1111
    push dword 0x2222
    call SEL_CGATE:0
    mov [u_esp_after], esp
    ; POPF at CPL 3 cannot change IOPL; with IOPL 3 it may change IF
    pushfd
    and dword [esp], ~0x3200
    popfd
    pushfd
    pop eax
    and eax, 0x3200
    mov [u_popf], eax
    RESUME .p4
    hlt
.p4:
    RESUME .p5
    mov eax, cr0
.p5:
    RESUME .p6
    mov cr3, eax
.p6:
    RESUME .p7
    lgdt [gdt_desc]
.p7:
    RESUME .p8
    invlpg [0]
.p8:
    RESUME .p9
    int 0x40                        ; DPL 0 gate: #GP(0x40 * 8 + 2)
.p9:
    RESUME .p10
    push dword 0x002
    push dword SEL_KCODE
    push dword .p10
    iret                            ; IRET to ring 0: #GP(8)
.p10:
    RESUME .p11
    clts
.p11:
    int 0x80

; ring 3 with IOPL 0: I/O, CLI/STI fault, POPF keeps IF
user2:
    RESUME .q1
    cli
.q1:
    RESUME .q2
    sti
.q2:
    RESUME .q3
    in al, 0x80
.q3:
    RESUME .q4
    mov dx, 0x80
    out dx, al
.q4:
    RESUME .q5
    insb
.q5:
    pushfd
    or dword [esp], 0x3200
    popfd
    pushfd
    pop eax
    and eax, 0x3200
    mov [u_popf], eax
    int 0x80

align 4
p_vec: dd 0
p_inside: dd 0
p_saved: dd 0
p_cs: dd 0
p_esp: dd 0
db_eip: dd 0
nsteps: dd 0
steps: times 4 dd 0
db_dr6: dd 0
db_fl: dd 0
u_fs: dd 0
u_gs: dd 0
u_cs: dd 0
u_fl: dd 0
u_esp_after: dd 0
u_popf: dd 0
cg_rec: times 7 dd 0
df_err: dd 0xffffffff
ts_err: dd 0
ts_cs: dd 0
ts_eip: dd 0
df_esp: dd 0
END_IMAGE
