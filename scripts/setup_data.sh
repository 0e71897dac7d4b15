# Sourced by scripts/lines.sh: the system packages that the reading data and its checks draw on.
# Fonts to train on and fonts held out for validation (nanovlm/textlines.py splits them by family), an English word
# list (wamerican, split into a training and a validation lexicon), typeset PDF manuals for real print, and
# tesseract for the comparison row. Installed with apt-get where this machine allows it; otherwise one line says
# what is missing and the run goes on with what is there (nanovlm/textlines.py says what it lacks).
# Never installed here: the fonts and the manuals that independent checks keep for themselves (README).
PDF_PACKAGES="gnuplot-doc asymptote-doc camlidl-doc gmsh-doc glpk-doc auto-multiple-choice-doc-pdf debian-reference-en fonts-sil-charis"
DATA_PACKAGES="wamerican tesseract-ocr tesseract-ocr-eng poppler-utils
 fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 fonts-croscore fonts-crosextra-carlito
 fonts-crosextra-caladea fonts-noto-core fonts-noto-mono fonts-open-sans fonts-roboto-unhinted fonts-lato
 fonts-linuxlibertine fonts-ebgaramond fonts-inconsolata fonts-hack fonts-firacode fonts-sil-gentiumplus
 fonts-sil-charis fonts-stix fonts-lmodern fonts-cantarell fonts-go fonts-adf-accanthis fonts-adf-baskervald
 fonts-adf-berenis fonts-adf-gillius fonts-adf-universalis fonts-adf-romande fonts-adf-tribun fonts-adf-verana
 fonts-adf-mekanus fonts-cabin fonts-quattrocento fonts-jetbrains-mono fonts-oldstandard fonts-comfortaa
 fonts-sil-andika fonts-cmu fonts-courier-prime fonts-league-spartan fonts-yanone-kaffeesatz
 fonts-averia-serif-gwf fonts-tuffy"
missing_packages() {
    local p
    for p in $DATA_PACKAGES $PDF_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s ' "$p"
    done
}
missing=$(missing_packages)
if [ -n "$missing" ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "installing the data packages: $missing"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            $missing >/dev/null) || echo "warning: apt-get could not install all of: $missing"
    else
        echo "warning: cannot install Debian packages here (no apt-get, or not root); missing: $missing"
        echo "         training uses the fonts that are installed; the checks that need the rest say so"
    fi
fi
