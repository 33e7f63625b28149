; Two CPUs through their local APICs (qemu-smp: 2): the BSP starts the AP with INIT and
; STARTUP (a real-mode trampoline that enters protected mode and paging), then both run
; a script of phases in step, each waiting for the other through memory and IPIs:
;  2 IPI ping-pong, each side halted (STI; HLT) while it waits for the other's IPI;
;  3 TLB shootdown as an OS does it: the BSP remaps a page the AP has in its TLB, sends an
;    IPI, and spins until the AP's handler has run INVLPG and read the new frame;
;  4 the AP's own APIC timer (periodic) ticking while the BSP spins with IF=0;
;  5 the BSP's one-shot APIC timer waking it from HLT while the AP spins;
;  6 a lower-priority IPI arriving while the AP is in a higher vector's handler (held back
;    by the ISR even with IF=1), delivered once that handler's EOI lowers the priority;
;  7 an IPI held back by the AP's task priority (TPR), taken when the TPR is lowered;
;  8 INIT and STARTUP again to the halted AP: it comes back with its APIC reset.
; A wait that never ends prints "timeout" with the phase (the BSP's APIC timer counts
; it). Only what does not depend on timing is printed.
%define EXIT_CODE 0x53
%include "lib.inc"

%define APIC            0xfee00000
%define APIC_ID         APIC + 0x20
%define APIC_VERSION    APIC + 0x30
%define APIC_TPR        APIC + 0x80
%define APIC_EOI        APIC + 0xb0
%define APIC_SVR        APIC + 0xf0
%define APIC_ICR_LO     APIC + 0x300
%define APIC_ICR_HI     APIC + 0x310
%define APIC_LVT_TIMER  APIC + 0x320
%define APIC_TMR_INIT   APIC + 0x380
%define APIC_TMR_COUNT  APIC + 0x390
%define APIC_TMR_DIV    APIC + 0x3e0
%define MASKED          0x10000
%define PERIODIC        0x20000

%define TRAMPOLINE      0x8000          ; STARTUP vector 0x08
%define AP_STACK        0x188000
%define PD              0x200000
%define PT0             0x201000        ; the first 4 MiB in 4 KiB pages
%define VPAGE           0x3f0000        ; the page the shootdown remaps
%define FRAME1          0x300000
%define FRAME2          0x301000
%define ROUNDS          100

%define V_PING          0x40            ; BSP -> AP (also wakes the AP for each phase)
%define V_PONG          0x41            ; AP -> BSP
%define V_SHOOT         0x42            ; BSP -> AP: flush the TLB entry
%define V_LOW           0x45            ; phase 6, class 4
%define V_TPR           0x46            ; phase 7, class 4
%define V_AP_TICK       0x50            ; the AP's periodic timer
%define V_BSP_TIMER     0x51            ; the BSP's one-shot timer
%define V_WATCHDOG      0x52            ; the BSP's timer while it sleeps in a wait
%define V_HIGH          0x60            ; phase 6, class 6

; IPI dest, ICR low: physical destination, then wait until the APIC has sent it.
%macro IPI 2
    mov dword [APIC_ICR_HI], (%1) << 24
    mov dword [APIC_ICR_LO], %2
%%busy:
    test dword [APIC_ICR_LO], 1 << 12
    jnz %%busy
%endmacro

; SLEEP_UNTIL addr, value / SPIN_UNTIL addr, value: the BSP waits for dword [addr] ==
; value, halted (IF=1 while halted) or spinning with IF=0.
%macro SLEEP_UNTIL 2
    mov esi, %1
    mov eax, %2
    call sleep_until
%endmacro
%macro SPIN_UNTIL 2
    mov esi, %1
    mov eax, %2
    call spin_until
%endmacro

main:
    ; identity paging: 4 KiB pages below 4 MiB (VPAGE remappable), 4 MiB pages above
    mov edi, PT0
    mov eax, 3
    mov ecx, 1024
.pt:
    stosd
    add eax, 0x1000
    loop .pt
    mov dword [PT0 + (VPAGE >> 12) * 4], FRAME1 | 3
    mov dword [FRAME1], 0
    mov dword [PD], PT0 | 3
    mov eax, (1 << 22) | 0x83
    mov ecx, 1
.pd:
    mov [PD + ecx * 4], eax
    add eax, 1 << 22
    inc ecx
    cmp ecx, 1024
    jne .pd
    call paging_on

    mov dword [hook + V_PING * 4], h_ping
    mov dword [hook + V_PONG * 4], h_pong
    mov dword [hook + V_SHOOT * 4], h_shoot
    mov dword [hook + V_LOW * 4], h_low
    mov dword [hook + V_TPR * 4], h_tpr
    mov dword [hook + V_AP_TICK * 4], h_ap_tick
    mov dword [hook + V_BSP_TIMER * 4], h_bsp_timer
    mov dword [hook + V_WATCHDOG * 4], h_watchdog
    mov dword [hook + V_HIGH * 4], h_high

    mov dword [APIC_SVR], 0x1ff
    mov eax, [APIC_ID]
    shr eax, 24
    SHOW "bsp id", eax
    mov ecx, 0x1b
    rdmsr
    and eax, 0x900                      ; BSP flag, global enable
    SHOW "apicbase", eax
    mov eax, [APIC_VERSION]
    and eax, 0xff
    SHOW "version", eax
    call nl

    ; phase 1: INIT, INIT de-assert, STARTUP
    mov dword [phase], 1
    mov esi, trampoline
    mov edi, TRAMPOLINE
    mov ecx, trampoline_end - trampoline
    rep movsb
    IPI 1, 0x0000c500
    IPI 1, 0x00008500
    IPI 1, 0x00000600 | (TRAMPOLINE >> 12)
    SPIN_UNTIL ap_count, 1
    SHOW "ap id", [ap_id]
    SHOW "apicbase", [ap_base]
    call nl

    ; phase 2: ping-pong, both sides halted while they wait
    mov dword [phase], 2
    xor ecx, ecx
.ping:
    inc ecx
    mov [ping], ecx
    IPI 1, V_PING
    push ecx
    SLEEP_UNTIL pong, ecx
    pop ecx
    cmp ecx, ROUNDS
    jne .ping
    SHOW "ping-pong rounds", ecx        ; (how many IPIs were taken depends on timing)
    call nl

    ; phase 3: shootdown; round n maps VPAGE to the frame holding n
    mov dword [phase], 3
    xor ecx, ecx
    xor ebx, ebx                        ; rounds where the AP read a stale frame
.shoot:
    inc ecx
    mov eax, FRAME1
    test ecx, 1
    jz .frame
    mov eax, FRAME2
.frame:
    mov [eax], ecx
    or eax, 3
    mov [PT0 + (VPAGE >> 12) * 4], eax
    invlpg [VPAGE]
    mov [shoot], ecx
    IPI 1, V_SHOOT
    push ecx
    SPIN_UNTIL shoot_ack, ecx
    pop ecx
    cmp [shoot_seen], ecx
    je .fresh
    inc ebx
.fresh:
    cmp ecx, ROUNDS
    jne .shoot
    SHOW "shootdown rounds", ecx
    SHOW "stale", ebx
    call nl

    ; phase 4: the AP's periodic timer while the BSP spins
    mov dword [phase], 4
    IPI 1, V_PING
    SPIN_UNTIL ap_timer_done, 1
    PRINT "ap timer: 10 ticks while the bsp spun"
    call nl

    ; phase 5: the BSP's one-shot timer wakes it from HLT while the AP spins
    mov dword [phase], 5
    IPI 1, V_PING
    mov dword [APIC_TMR_DIV], 0xb       ; divide by 1
    mov dword [APIC_LVT_TIMER], V_BSP_TIMER
    mov dword [APIC_TMR_INIT], 1000000
.sleep5:
    cli
    cmp dword [bsp_fired], 0
    jne .woke5
    sti
    hlt
    jmp .sleep5
.woke5:
    mov dword [bsp_timer_done], 1
    PRINT "bsp one-shot timer: woke from hlt"
    call nl

    ; phase 6: V_LOW held back by the AP's handler of V_HIGH, then taken
    mov dword [phase], 6
    IPI 1, V_HIGH
    SPIN_UNTIL in_high, 1
    IPI 1, V_LOW
    mov dword [sent_low], 1
    SPIN_UNTIL got_low, 1
    SHOW "isr: low taken in high", [low_early]
    PRINT "then after eoi"
    call nl

    ; phase 7: V_TPR held back by the AP's TPR, then taken
    mov dword [phase], 7
    IPI 1, V_PING
    SPIN_UNTIL tpr_up, 1
    IPI 1, V_TPR
    mov dword [sent_tpr], 1
    SPIN_UNTIL got_tpr, 1
    SHOW "tpr: taken early", [tpr_early]
    PRINT "then when lowered"
    call nl

    ; phase 8: INIT and STARTUP to the halted AP again
    mov dword [phase], 8
    IPI 1, 0x0000c500
    IPI 1, 0x00008500
    IPI 1, 0x00000600 | (TRAMPOLINE >> 12)
    SPIN_UNTIL ap_count, 2
    SHOW "init again: ap svr", [ap_svr]
    SHOW "tpr", [ap_tpr]
    call nl
    ret

paging_on:
    mov eax, PD
    mov cr3, eax
    mov eax, cr4
    or eax, 0x10                        ; PSE
    mov cr4, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    ret

; sleep_until / spin_until: wait for dword [esi] == eax, about 8 s at most by the BSP's
; APIC timer (divide by 2, the whole count): then "timeout" and the exit.
sleep_until:
    mov dword [watchdog], 0
    mov dword [APIC_TMR_DIV], 0
    mov dword [APIC_LVT_TIMER], V_WATCHDOG
    mov dword [APIC_TMR_INIT], 0xffffffff
.wait:
    cli
    cmp [esi], eax
    je stop_watchdog
    cmp dword [watchdog], 0
    jne timeout
    sti
    hlt
    jmp .wait
spin_until:
    mov dword [APIC_TMR_DIV], 0
    mov dword [APIC_LVT_TIMER], MASKED
    mov dword [APIC_TMR_INIT], 0xffffffff
.spin:
    cmp [esi], eax
    je stop_watchdog
    pause
    cmp dword [APIC_TMR_COUNT], 0
    jne .spin
timeout:
    PRINT "timeout in phase "
    mov eax, [phase]
    call hex8
    call nl
    mov al, 0x7e
    out 0xf4, al
    cli
    hlt
stop_watchdog:
    mov dword [APIC_LVT_TIMER], MASKED
    mov dword [APIC_TMR_INIT], 0
    ret

; -------------------------------------------------------------- interrupt handlers
; (hooks: [esp] vector, [esp + 4] error code, then the IRET frame)
%macro EOI_IRET 0
    mov dword [APIC_EOI], 0
    add esp, 8
    iret
%endmacro

h_ping:                                 ; AP
    lock inc dword [ap_pings]
    EOI_IRET
h_pong:                                 ; BSP
    lock inc dword [bsp_pongs]
    EOI_IRET
h_shoot:                                ; AP
    push eax
    invlpg [VPAGE]
    mov eax, [VPAGE]
    mov [shoot_seen], eax
    mov eax, [shoot]
    mov [shoot_ack], eax                ; last: the BSP reads shoot_seen once it sees this
    pop eax
    EOI_IRET
h_ap_tick:                              ; AP
    lock inc dword [ap_ticks]
    EOI_IRET
h_bsp_timer:                            ; BSP
    mov dword [bsp_fired], 1
    EOI_IRET
h_watchdog:                             ; BSP
    mov dword [watchdog], 1
    EOI_IRET
h_high:                                 ; AP, IF=0
    push ecx
    mov dword [in_high], 1
.wait:
    pause
    cmp dword [sent_low], 1
    jne .wait
    sti                                 ; V_LOW is pending, below the ISR's V_HIGH
    mov ecx, 2000
.shadow:
    loop .shadow
    cli
    mov ecx, [got_low]
    mov [low_early], ecx
    pop ecx
    EOI_IRET                            ; now V_LOW comes (IF=1 again after IRET)
h_low:                                  ; AP
    mov dword [got_low], 1
    EOI_IRET
h_tpr:                                  ; AP
    mov dword [got_tpr], 1
    EOI_IRET

; -------------------------------------------------------------- the AP
; ap_wait_phase: sleep until [phase] == eax, touching VPAGE at every wake-up (so that its
; mapping is in this CPU's TLB when the BSP changes it)
ap_wait_phase:
.wait:
    cli
    mov edx, [VPAGE]
    cmp [phase], eax
    je .go
    sti
    hlt
    jmp .wait
.go:
    ret

ap_entry:
    mov ax, SEL_KDATA
    mov ds, ax
    mov es, ax
    mov fs, ax
    mov gs, ax
    mov ss, ax
    mov esp, AP_STACK
    lidt [idt_desc]
    cmp dword [phase], 8
    je .again
    call paging_on
    mov dword [APIC_SVR], 0x1ff
    mov eax, [APIC_ID]
    shr eax, 24
    mov [ap_id], eax
    mov ecx, 0x1b
    rdmsr
    and eax, 0x900
    mov [ap_base], eax
    lock inc dword [ap_count]

    ; phase 2: answer each ping with a pong, halted in between
    xor ecx, ecx
.pong:
    cli
    mov eax, [ping]
    cmp eax, ecx
    jne .answer
    sti
    hlt
    jmp .pong
.answer:
    mov ecx, eax
    mov [pong], ecx
    IPI 0, V_PONG
    cmp ecx, ROUNDS
    jne .pong

    ; phase 3 happens in h_shoot, phase 4: the periodic timer
    mov eax, 4
    call ap_wait_phase
    mov dword [APIC_TMR_DIV], 0xb
    mov dword [APIC_LVT_TIMER], PERIODIC | V_AP_TICK
    mov dword [APIC_TMR_INIT], 100000
.tick:
    cli
    cmp dword [ap_ticks], 10
    jae .ticked
    sti
    hlt
    jmp .tick
.ticked:
    mov dword [APIC_LVT_TIMER], MASKED | PERIODIC | V_AP_TICK
    mov dword [APIC_TMR_INIT], 0
    mov dword [ap_timer_done], 1

    ; phase 5: spin while the BSP sleeps
    mov eax, 5
    call ap_wait_phase
.spin5:
    pause
    cmp dword [bsp_timer_done], 1
    jne .spin5

    ; phase 6 happens in h_high and h_low; phase 7: the task priority
    mov eax, 7
    call ap_wait_phase
    mov dword [APIC_TPR], 0x50
    sti
    mov dword [tpr_up], 1
.held:
    pause
    cmp dword [sent_tpr], 1
    jne .held
    mov ecx, 2000
.busy:
    loop .busy
    mov eax, [got_tpr]
    mov [tpr_early], eax
    mov dword [APIC_TPR], 0
.taken:
    pause
    cmp dword [got_tpr], 1
    jne .taken
    jmp .park                           ; until INIT
.again:                                 ; after the second INIT/STARTUP, paging off
    mov eax, [APIC_SVR]
    mov [ap_svr], eax
    mov eax, [APIC_TPR]
    mov [ap_tpr], eax
    lock inc dword [ap_count]
.park:
    cli
    hlt
    jmp .park

bits 16
trampoline:                             ; at 0000:8000 in real mode
    cli
    xor ax, ax
    mov ds, ax
    o32 lgdt [TRAMPOLINE + tr_gdt - trampoline]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    jmp dword SEL_KCODE:ap_entry
tr_gdt:
    dw gdt_end - gdt - 1
    dd gdt
trampoline_end:
bits 32

align 4
phase: dd 0
ap_count: dd 0
ap_id: dd 0
ap_base: dd 0
ping: dd 0
pong: dd 0
ap_pings: dd 0
bsp_pongs: dd 0
shoot: dd 0
shoot_ack: dd 0
shoot_seen: dd 0
ap_ticks: dd 0
ap_timer_done: dd 0
bsp_fired: dd 0
bsp_timer_done: dd 0
watchdog: dd 0
in_high: dd 0
sent_low: dd 0
got_low: dd 0
low_early: dd 0
tpr_up: dd 0
sent_tpr: dd 0
got_tpr: dd 0
tpr_early: dd 0
ap_svr: dd 0
ap_tpr: dd 0

END_IMAGE
