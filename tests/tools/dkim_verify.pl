#!/usr/bin/perl
# Independent DKIM verifier for the tests (Mail::DKIM, shares no code with the signer).
# Usage: dkim_verify.pl KEYS_FILE < message
# KEYS_FILE: one "selector._domainkey.domain<TAB>TXT record" per line (offline DNS).
# Prints one line per signature: "result<TAB>d=<TAB>s=<TAB>a=<TAB>h=<TAB>detail"
# (h= is the whole colon-separated list; detail is Mail::DKIM's result_detail).
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::PublicKey;

my %records;
open(my $fh, '<', $ARGV[0]) or die "cannot open $ARGV[0]: $!";
while (my $line = <$fh>) {
    chomp $line;
    my ($name, $txt) = split /\t/, $line, 2;
    $records{lc $name} = $txt;
}
close $fh;

no warnings 'redefine';
*Mail::DKIM::PublicKey::fetch_async = sub {
    my ($class, %prms) = @_;
    my $on_success = ($prms{Callbacks} || {})->{Success} || sub { $_[0] };
    my $txt = $records{lc("$prms{Selector}._domainkey.$prms{Domain}")};
    return sub { return $on_success->() } unless defined $txt;
    my $key = $class->parse($txt);
    $key->{Selector} = $prms{Selector};
    $key->{Domain} = $prms{Domain};
    $key->check;
    return sub { return $on_success->($key) };
};

my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
foreach my $sig ($dkim->signatures) {
    printf "%s\td=%s\ts=%s\ta=%s\th=%s\t%s\n", $sig->result, $sig->domain, $sig->selector,
        $sig->algorithm, join(':', $sig->headerlist), $sig->result_detail;
}
