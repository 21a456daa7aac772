-- perc.lua: Wireshark dissectors for PERC (Privacy Enhanced RTP Conferencing).
--
--   perc_tunnel  RFC 9185 tunnel messages between a Media Distributor (MDD) and the Key
--                Distributor (KMF), carried as TLS application data over TCP. Found on the
--                configured port (default 4444, the KMF's usual listener), by a heuristic on
--                decrypted TLS application data, or with "Decode As" on plain TCP. The
--                DTLS inside TunneledDtls goes to Wireshark's DTLS dissector, one DTLS
--                conversation per association id, so each endpoint's DTLS decrypts with its
--                own keys.
--   perc_ektkey  The EKTKey handshake message (RFC 8870 §5.2.2, type 26), which Wireshark's
--                DTLS dissector decrypts but leaves unparsed; a postdissector finds it.
--   perc_ekt     The EKT field at the end of SRTP packets (RFC 8870 §4.1): Full (ciphertext,
--                SPI, epoch, length, type 2) or Short (type 0), by a heuristic on UDP that
--                hands the SRTP part to the RTP dissector.
--
-- Load with `tshark -X lua_script:perc.lua` or copy into the personal Lua plugins folder;
-- see README.md next to this file. Requires Wireshark 3.6 or later (tested with 4.0).

local TUNNEL_PORT_DEFAULT = 4444

local MSG_TYPES = {
    [1] = "SupportedProfiles",
    [2] = "UnsupportedVersion",
    [3] = "MediaKeys",
    [4] = "TunneledDtls",
    [5] = "EndpointDisconnect",
}

-- RFC 5764 / RFC 7714 / RFC 8723 SRTP protection profiles.
local SRTP_PROFILES = {
    [0x0001] = "SRTP_AES128_CM_HMAC_SHA1_80",
    [0x0002] = "SRTP_AES128_CM_HMAC_SHA1_32",
    [0x0005] = "SRTP_NULL_HMAC_SHA1_80",
    [0x0006] = "SRTP_NULL_HMAC_SHA1_32",
    [0x0007] = "SRTP_AEAD_AES_128_GCM",
    [0x0008] = "SRTP_AEAD_AES_256_GCM",
    [0x0009] = "DOUBLE_AEAD_AES_128_GCM_AEAD_AES_128_GCM",
    [0x000A] = "DOUBLE_AEAD_AES_256_GCM_AEAD_AES_256_GCM",
}

---------------------------------------------------------------------------------------------
-- RFC 9185 tunnel
---------------------------------------------------------------------------------------------

local tunnel = Proto("perc_tunnel", "PERC DTLS Tunnel (RFC 9185)")

local tf = {
    msg_type = ProtoField.uint8("perc_tunnel.msg_type", "Message Type", base.DEC, MSG_TYPES),
    length = ProtoField.uint16("perc_tunnel.length", "Length", base.DEC),
    version = ProtoField.uint8("perc_tunnel.version", "Version", base.DEC),
    profiles_length = ProtoField.uint16("perc_tunnel.profiles_length",
        "Protection Profiles Length", base.DEC),
    profile = ProtoField.uint16("perc_tunnel.profile", "Protection Profile", base.HEX,
        SRTP_PROFILES),
    highest_version = ProtoField.uint8("perc_tunnel.highest_version", "Highest Version",
        base.DEC),
    protection_profile = ProtoField.uint16("perc_tunnel.protection_profile",
        "Selected Protection Profile", base.HEX, SRTP_PROFILES),
    association_id = ProtoField.guid("perc_tunnel.association_id", "Association ID"),
    mki_length = ProtoField.uint8("perc_tunnel.mki_length", "MKI Length", base.DEC),
    mki = ProtoField.bytes("perc_tunnel.mki", "MKI"),
    client_key_length = ProtoField.uint8("perc_tunnel.client_write_key_length",
        "Client Write SRTP Master Key Length", base.DEC),
    client_key = ProtoField.bytes("perc_tunnel.client_write_key",
        "Client Write SRTP Master Key"),
    server_key_length = ProtoField.uint8("perc_tunnel.server_write_key_length",
        "Server Write SRTP Master Key Length", base.DEC),
    server_key = ProtoField.bytes("perc_tunnel.server_write_key",
        "Server Write SRTP Master Key"),
    client_salt_length = ProtoField.uint8("perc_tunnel.client_write_salt_length",
        "Client Write SRTP Master Salt Length", base.DEC),
    client_salt = ProtoField.bytes("perc_tunnel.client_write_salt",
        "Client Write SRTP Master Salt"),
    server_salt_length = ProtoField.uint8("perc_tunnel.server_write_salt_length",
        "Server Write SRTP Master Salt Length", base.DEC),
    server_salt = ProtoField.bytes("perc_tunnel.server_write_salt",
        "Server Write SRTP Master Salt"),
    dtls_length = ProtoField.uint16("perc_tunnel.dtls_length", "DTLS Message Length",
        base.DEC),
    dtls_message = ProtoField.bytes("perc_tunnel.dtls_message", "DTLS Message"),
    trailing = ProtoField.bytes("perc_tunnel.trailing", "Trailing Bytes"),
}
tunnel.fields = tf

local ef = {
    malformed = ProtoExpert.new("perc_tunnel.malformed", "Malformed tunnel message",
        expert.group.MALFORMED, expert.severity.ERROR),
    unknown_type = ProtoExpert.new("perc_tunnel.unknown_type", "Unknown tunnel message type",
        expert.group.MALFORMED, expert.severity.ERROR),
    version = ProtoExpert.new("perc_tunnel.unsupported_version",
        "Tunnel version other than 0 (RFC 9185)", expert.group.PROTOCOL, expert.severity.WARN),
}
tunnel.experts = { ef.malformed, ef.unknown_type, ef.version }

tunnel.prefs.port = Pref.uint("TLS tunnel TCP port", TUNNEL_PORT_DEFAULT,
    "TCP port of the KMF's TLS tunnel listener (0: none; the heuristic still applies)")
tunnel.prefs.desegment = Pref.bool("Reassemble tunnel messages", true,
    "Reassemble tunnel messages that span TLS records or TCP segments")
tunnel.prefs.heuristic = Pref.bool("Detect tunnels on any TLS port", true,
    "Try the tunnel dissector on decrypted TLS application data of other ports")

local dtls_handle = Dissector.get("dtls")
local f_tcp_stream = Field.new("tcp.stream")

-- Per TCP stream: the MDD's (TLS client's) port, learnt from its SupportedProfiles, and
-- whether the stream is known to carry a tunnel (so the heuristic need not guess again).
local mdd_port_of_stream = {}
local tunnel_streams = {}

local function stream_id()
    local fi = f_tcp_stream()
    if fi then return fi.value end
    return nil
end

-- A stable 16-bit stand-in port for an association id: the DTLS dissector keys its session
-- (and so its decryption state) by addresses and ports, so giving each association its own
-- port on the MDD's side gives each its own DTLS conversation inside the one TCP stream.
local function association_port(uuid_bytes, avoid)
    local h = 0
    for i = 0, uuid_bytes:len() - 1 do
        h = (h * 31 + uuid_bytes:get_index(i)) % 65521
    end
    local port = 1024 + (h % 64000)
    if port == avoid then port = port + 1 end
    return port
end

local function kmf_side_is_src(pinfo)
    local stream = stream_id()
    local mdd_port = stream and mdd_port_of_stream[stream]
    if mdd_port then return pinfo.src_port ~= mdd_port end
    local port = tunnel.prefs.port
    if port ~= 0 and (pinfo.src_port == port or pinfo.dst_port == port) then
        return pinfo.src_port == port
    end
    -- Unknown: the listener usually has the lower (non-ephemeral) port.
    return pinfo.src_port < pinfo.dst_port
end

local function call_dtls(buf, pinfo, tree, uuid_bytes)
    local from_kmf = kmf_side_is_src(pinfo)
    local kmf_port = from_kmf and pinfo.src_port or pinfo.dst_port
    local fake = association_port(uuid_bytes, kmf_port)
    local src, dst = pinfo.src_port, pinfo.dst_port
    if from_kmf then pinfo.dst_port = fake else pinfo.src_port = fake end
    -- Only DTLS's own summary ("Client Hello", ...) is wanted from the info column here.
    pinfo.cols.info:clear()
    -- A DTLS failure must not take the tunnel tree down with it.
    local ok, err = pcall(function() dtls_handle:call(buf, pinfo, tree) end)
    pinfo.src_port, pinfo.dst_port = src, dst
    if not ok then
        tree:add_proto_expert_info(ef.malformed, "DTLS dissector failed: " .. tostring(err))
        return nil
    end
    local summary = tostring(pinfo.cols.info)
    if summary == "" then return nil end
    return summary
end

-- Dissect the body of one message; `t` is the message's tree, `buf` the whole message
-- (header + body, exactly 3 + length bytes). Returns an error string for malformed bodies.
local function dissect_body(msg_type, buf, pinfo, t, tree)
    local len = buf:len() - 3
    local function need(n)
        return len >= n
    end
    if msg_type == 1 then
        if not need(3) then return "SupportedProfiles shorter than 3 bytes" end
        local v = buf(3, 1):uint()
        local vi = t:add(tf.version, buf(3, 1))
        if v ~= 0 then vi:add_proto_expert_info(ef.version) end
        local n = buf(4, 2):uint()
        t:add(tf.profiles_length, buf(4, 2))
        if n < 2 or n % 2 ~= 0 then return "profile list length must be even and >= 2" end
        if 3 + n ~= len then return "profile list length disagrees with the message length" end
        for off = 6, 5 + n, 2 do t:add(tf.profile, buf(off, 2)) end
        local stream = stream_id()
        if stream and v == 0 then mdd_port_of_stream[stream] = pinfo.src_port end
        return nil
    elseif msg_type == 2 then
        if len ~= 1 then return "UnsupportedVersion body must be 1 byte" end
        t:add(tf.highest_version, buf(3, 1))
        return nil
    elseif msg_type == 5 then
        if len ~= 16 then return "EndpointDisconnect body must be 16 bytes" end
        t:add(tf.association_id, buf(3, 16))
        return nil
    elseif msg_type == 3 then
        if not need(16 + 2) then return "MediaKeys shorter than its fixed part" end
        t:add(tf.association_id, buf(3, 16))
        t:add(tf.protection_profile, buf(19, 2))
        local limit = 3 + len
        local off = 21
        local specs = {
            { tf.mki_length, tf.mki, 0 },
            { tf.client_key_length, tf.client_key, 1 },
            { tf.server_key_length, tf.server_key, 1 },
            { tf.client_salt_length, tf.client_salt, 1 },
            { tf.server_salt_length, tf.server_salt, 1 },
        }
        for _, s in ipairs(specs) do
            if off + 1 > limit then return "MediaKeys truncated" end
            local n = buf(off, 1):uint()
            t:add(s[1], buf(off, 1))
            if n < s[3] then return "empty key or salt in MediaKeys" end
            if off + 1 + n > limit then return "MediaKeys vector runs past the message" end
            if n > 0 then t:add(s[2], buf(off + 1, n)) end
            off = off + 1 + n
        end
        if off ~= limit then
            t:add(tf.trailing, buf(off, limit - off))
            return "bytes after the last MediaKeys field"
        end
        return nil
    elseif msg_type == 4 then
        if not need(16 + 2) then return "TunneledDtls shorter than its fixed part" end
        t:add(tf.association_id, buf(3, 16))
        local n = buf(19, 2):uint()
        t:add(tf.dtls_length, buf(19, 2))
        if n < 1 then return "empty DTLS message" end
        if 18 + n ~= len then return "DTLS message length disagrees with the message length" end
        t:add(tf.dtls_message, buf(21, n))
        local summary = call_dtls(buf(21, n):tvb(), pinfo, tree, buf(3, 16):bytes())
        if summary then t:append_text(" (" .. summary .. ")") end
        return nil, summary
    end
    return nil
end

local function dissect_message(buf, pinfo, tree, root)
    local msg_type = buf(0, 1):uint()
    local name = MSG_TYPES[msg_type]
    local t = tree:add(tunnel, buf)
    t:add(tf.msg_type, buf(0, 1))
    t:add(tf.length, buf(1, 2))
    if name == nil then
        t:append_text(string.format(", Unknown type %d", msg_type))
        t:add_proto_expert_info(ef.unknown_type, string.format("Unknown message type %d",
            msg_type))
        return "Unknown(" .. msg_type .. ")"
    end
    t:append_text(", " .. name)
    local err, summary = dissect_body(msg_type, buf, pinfo, t, root)
    if err then
        t:add_proto_expert_info(ef.malformed, name .. ": " .. err)
        return name .. " [Malformed]"
    end
    if summary then return name .. " (" .. summary .. ")" end
    return name
end

-- Frame messages out of `tvb`. Returns the bytes consumed, asking for more (desegmentation)
-- when a message is incomplete and reassembly is possible.
local function dissect_tunnel(tvb, pinfo, tree)
    local total = tvb:len()
    local offset = 0
    local names = {}
    local can_desegment = tunnel.prefs.desegment and pinfo.can_desegment > 0
    while offset < total do
        local remaining = total - offset
        if remaining < 3 then
            if can_desegment then
                pinfo.desegment_offset = offset
                pinfo.desegment_len = DESEGMENT_ONE_MORE_SEGMENT
                break
            end
            local t = tree:add(tunnel, tvb(offset, remaining))
            t:add_proto_expert_info(ef.malformed, "Truncated message header")
            names[#names + 1] = "Truncated"
            offset = total
            break
        end
        local len = tvb(offset + 1, 2):uint()
        if remaining < 3 + len then
            if can_desegment then
                pinfo.desegment_offset = offset
                pinfo.desegment_len = 3 + len - remaining
                break
            end
            local t = tree:add(tunnel, tvb(offset, remaining))
            t:add(tf.msg_type, tvb(offset, 1))
            t:add(tf.length, tvb(offset + 1, 2))
            t:add_proto_expert_info(ef.malformed, string.format(
                "Truncated message: length %d, %d bytes present", len, remaining - 3))
            names[#names + 1] = "Truncated"
            offset = total
            break
        end
        names[#names + 1] = dissect_message(tvb(offset, 3 + len):tvb(), pinfo, tree, tree)
        offset = offset + 3 + len
    end
    if #names > 0 then
        pinfo.cols.protocol = "PERC"
        pinfo.cols.info = table.concat(names, ", ")
        pinfo.cols.info:fence()
    end
    -- Everything is either dissected or waiting for more data; returning less (0 when the
    -- first message is incomplete) would tell TCP the bytes are not ours.
    return total
end

function tunnel.dissector(tvb, pinfo, tree)
    local stream = stream_id()
    if stream then tunnel_streams[stream] = true end
    -- The DTLS dissector writes the columns of what it finds; keep ours first.
    return dissect_tunnel(tvb, pinfo, tree)
end

-- Does `tvb` start with a plausible tunnel message? Strict enough for "any TLS stream": the
-- type must be known and its length must fit the type's shape.
local function looks_like_tunnel(tvb)
    if tvb:len() < 3 then return false end
    local t = tvb(0, 1):uint()
    local len = tvb(1, 2):uint()
    if t == 1 then
        if len < 3 or tvb:len() < 6 then return false end
        local n = tvb(4, 2):uint()
        return n >= 2 and n % 2 == 0 and 3 + n == len
    elseif t == 2 then
        return len == 1
    elseif t == 5 then
        return len == 16
    elseif t == 3 then
        -- the five length-prefixed vectors must end exactly at the message's end
        if len < 16 + 2 + 5 or tvb:len() < 3 + len then return false end
        local off = 21
        for i = 1, 5 do
            local n = tvb(off, 1):uint()
            if i > 1 and n == 0 then return false end
            off = off + 1 + n
            if off > 3 + len or (i < 5 and off >= 3 + len) then return false end
        end
        return off == 3 + len
    elseif t == 4 then
        if len < 19 or tvb:len() < 22 then return false end
        local first = tvb(21, 1):uint()  -- a DTLS record (RFC 7983: 20..63)
        return tvb(19, 2):uint() + 18 == len and first >= 20 and first <= 63
    end
    return false
end

local function heuristic(tvb, pinfo, tree)
    if not tunnel.prefs.heuristic then return false end
    local stream = stream_id()
    if not (stream and tunnel_streams[stream]) and not looks_like_tunnel(tvb) then
        return false
    end
    tunnel.dissector(tvb, pinfo, tree)
    return true
end
tunnel:register_heuristic("tls", heuristic)

local tls_handle = Dissector.get("tls")
local registered_port = 0

local function register_port()
    local tcp_table = DissectorTable.get("tcp.port")
    local tls_table = DissectorTable.get("tls.port")
    if registered_port ~= 0 then
        tcp_table:remove(registered_port, tls_handle)
        tls_table:remove(registered_port, tunnel)
    end
    registered_port = tunnel.prefs.port
    if registered_port ~= 0 then
        tcp_table:add(registered_port, tls_handle)
        tls_table:add(registered_port, tunnel)
    end
end

function tunnel.prefs_changed()
    if tunnel.prefs.port ~= registered_port then register_port() end
end

function tunnel.init()
    mdd_port_of_stream = {}
    tunnel_streams = {}
end

register_port()
-- Plain TCP (a capture behind a TLS-terminating proxy, or a test): "Decode As" perc_tunnel.
DissectorTable.get("tcp.port"):add_for_decode_as(tunnel)
DissectorTable.get("tls.port"):add_for_decode_as(tunnel)

---------------------------------------------------------------------------------------------
-- EKTKey handshake message (type 26), inside decrypted DTLS
---------------------------------------------------------------------------------------------

local ektkey = Proto("perc_ektkey", "PERC EKTKey (RFC 8870)")
local kf = {
    msg_type = ProtoField.uint8("perc_ektkey.msg_type", "Handshake Type", base.DEC,
        { [26] = "ekt_key" }),
    length = ProtoField.uint24("perc_ektkey.length", "Length", base.DEC),
    message_seq = ProtoField.uint16("perc_ektkey.message_seq", "Message Sequence", base.DEC),
    fragment_offset = ProtoField.uint24("perc_ektkey.fragment_offset", "Fragment Offset",
        base.DEC),
    fragment_length = ProtoField.uint24("perc_ektkey.fragment_length", "Fragment Length",
        base.DEC),
    key_length = ProtoField.uint16("perc_ektkey.key_length", "EKT Key Length", base.DEC),
    key = ProtoField.bytes("perc_ektkey.key", "EKT Key Value"),
    salt_length = ProtoField.uint16("perc_ektkey.salt_length", "SRTP Master Salt Length",
        base.DEC),
    salt = ProtoField.bytes("perc_ektkey.salt", "SRTP Master Salt"),
    spi = ProtoField.uint16("perc_ektkey.spi", "EKT SPI", base.DEC),
    ttl = ProtoField.uint24("perc_ektkey.ttl", "EKT TTL (seconds)", base.DEC),
}
ektkey.fields = kf
local ektkey_malformed = ProtoExpert.new("perc_ektkey.malformed", "Malformed EKTKey",
    expert.group.MALFORMED, expert.severity.ERROR)
ektkey.experts = { ektkey_malformed }

-- Wireshark 4.0's DTLS dissector decrypts handshake type 26 but shows it as a bare
-- "Handshake Protocol" item; its range (in the decrypted data) is what we parse.
local f_dtls_handshake = Field.new("dtls.handshake")

local function dissect_ektkey(range, tree)
    local n = range:len()
    if n < 12 or range(0, 1):uint() ~= 26 then return false end
    local t = tree:add(ektkey, range)
    t:add(kf.msg_type, range(0, 1))
    t:add(kf.length, range(1, 3))
    t:add(kf.message_seq, range(4, 2))
    t:add(kf.fragment_offset, range(6, 3))
    t:add(kf.fragment_length, range(9, 3))
    local frag_off = range(6, 3):uint()
    local frag_len = range(9, 3):uint()
    if frag_off ~= 0 or frag_len ~= range(1, 3):uint() then
        t:append_text(" (fragment)")
        return true
    end
    local limit = math.min(n, 12 + frag_len)
    local off = 12
    local function fail(why)
        t:add_proto_expert_info(ektkey_malformed, why)
        return true
    end
    if off + 2 > limit then return fail("key length missing") end
    local kl = range(off, 2):uint()
    t:add(kf.key_length, range(off, 2))
    if kl < 1 or off + 2 + kl > limit then return fail("key runs past the message") end
    t:add(kf.key, range(off + 2, kl))
    off = off + 2 + kl
    if off + 2 > limit then return fail("salt length missing") end
    local sl = range(off, 2):uint()
    t:add(kf.salt_length, range(off, 2))
    if sl < 1 or off + 2 + sl > limit then return fail("salt runs past the message") end
    t:add(kf.salt, range(off + 2, sl))
    off = off + 2 + sl
    if off + 5 > limit then return fail("SPI or TTL missing") end
    t:add(kf.spi, range(off, 2))
    t:add(kf.ttl, range(off + 2, 3))
    t:append_text(string.format(", SPI %d", range(off, 2):uint()))
    return true
end

function ektkey.dissector(tvb, pinfo, tree)
    local found = false
    for _, fi in ipairs({ f_dtls_handshake() }) do
        local ok, range = pcall(function() return fi.range end)
        if ok and range and dissect_ektkey(range, tree) then found = true end
    end
    if found then
        pinfo.cols.info:append(" (EKTKey)")
    end
end
register_postdissector(ektkey)

---------------------------------------------------------------------------------------------
-- EKT field at the end of SRTP (heuristic on UDP)
---------------------------------------------------------------------------------------------

local ekt = Proto("perc_ekt", "PERC EKT Field (RFC 8870)")
local xf = {
    type = ProtoField.uint8("perc_ekt.type", "EKT Message Type", base.DEC,
        { [0] = "Short", [2] = "Full" }),
    ciphertext = ProtoField.bytes("perc_ekt.ciphertext", "EKT Ciphertext"),
    spi = ProtoField.uint16("perc_ekt.spi", "Security Parameter Index", base.DEC),
    epoch = ProtoField.uint16("perc_ekt.epoch", "Epoch", base.DEC),
    length = ProtoField.uint16("perc_ekt.length", "Length", base.DEC),
    ssrc = ProtoField.uint32("perc_ekt.ssrc", "SSRC", base.HEX),
}
ekt.fields = xf
ekt.prefs.heuristic = Pref.bool("Detect SRTP with EKT on UDP", true,
    "Claim RTP-looking UDP datagrams that end in an EKT field (Full, or Short after a Full "
    .. "tag was seen for the SSRC)")

local rtp_handle = Dissector.get("rtp")
-- SSRCs seen with a Full tag: a Short tag is a single zero byte, far too weak to go on alone.
local ekt_ssrcs = {}
-- Frames whose EKT field the heuristic already showed (the postdissector skips them).
local ekt_done = {}

function ekt.init()
    ekt_ssrcs = {}
    ekt_done = {}
end

-- The EKT field's length at the end of `tvb`, or nil when there is none.
local function ekt_length(tvb)
    local n = tvb:len()
    if n < 13 then return nil end
    local b0 = tvb(0, 1):uint()
    if b0 < 128 or b0 > 191 then return nil end  -- RTP version 2 (RFC 7983)
    local pt = tvb(1, 1):uint()
    if pt >= 192 and pt <= 223 then return nil end  -- RTCP: EKT is SRTP-only
    local header = 12 + 4 * (b0 % 16)
    local last = tvb(n - 1, 1):uint()
    local ssrc = tvb(8, 4):uint()
    if last == 2 then
        if n < header + 10 then return nil end
        local len = tvb(n - 3, 2):uint()
        local clen = len - 7
        -- AES key wrap output: at least 16 bytes, a multiple of 8 (RFC 5649)
        if clen < 16 or clen % 8 ~= 0 or len > n - header then return nil end
        ekt_ssrcs[ssrc] = true
        return len
    elseif last == 0 and ekt_ssrcs[ssrc] then
        return 1
    end
    return nil
end

local function dissect_ekt_field(tvb, len, tree)
    local n = tvb:len()
    local t = tree:add(ekt, tvb(n - len, len))
    t:add(xf.ssrc, tvb(8, 4)):set_generated()
    if len == 1 then
        t:add(xf.type, tvb(n - 1, 1))
        t:append_text(", Short")
        return
    end
    t:add(xf.ciphertext, tvb(n - len, len - 7))
    t:add(xf.spi, tvb(n - 7, 2))
    t:add(xf.epoch, tvb(n - 5, 2))
    t:add(xf.length, tvb(n - 3, 2))
    t:add(xf.type, tvb(n - 1, 1))
    t:append_text(string.format(", Full, SPI %d, Epoch %d", tvb(n - 7, 2):uint(),
        tvb(n - 5, 2):uint()))
end

local function ekt_heuristic(tvb, pinfo, tree)
    if not ekt.prefs.heuristic then return false end
    local len = ekt_length(tvb)
    if len == nil then return false end
    local n = tvb:len()
    rtp_handle:call(tvb(0, n - len):tvb(), pinfo, tree)
    dissect_ekt_field(tvb, len, tree)
    ekt_done[pinfo.number] = true
    pinfo.cols.protocol = "SRTP+EKT"
    pinfo.cols.info:append(len == 1 and " EKT=Short" or " EKT=Full")
    return true
end
ekt:register_heuristic("udp", ekt_heuristic)

-- Once Wireshark's DTLS dissector has seen a use_srtp handshake on a UDP 5-tuple it makes RTP
-- (SRTP) that conversation's dissector, so heuristics never see those datagrams: find the EKT
-- field of every datagram dissected as RTP here, from the UDP payload's end.
local f_rtp_ssrc = Field.new("rtp.ssrc")
local f_udp_srcport = Field.new("udp.srcport")
local f_udp_length = Field.new("udp.length")

local ekt_post = Proto("perc_ekt_rtp", "PERC EKT Field on RTP (postdissector)")

function ekt_post.dissector(tvb, pinfo, tree)
    if ekt_done[pinfo.number] or not f_rtp_ssrc() then return end
    local port, ulen = f_udp_srcport(), f_udp_length()
    if not port or not ulen then return end
    local start = port.offset + 8
    local n = ulen.value - 8
    if n <= 0 or start + n > tvb:len() then return end
    local payload = tvb(start, n):tvb()
    local len = ekt_length(payload)
    if len == nil then return end
    dissect_ekt_field(payload, len, tree)
    pinfo.cols.info:append(len == 1 and " EKT=Short" or " EKT=Full")
end
register_postdissector(ekt_post)
